"""Distribution matching along other f-divergences (`dm_divergence`, after f-distill): the weights against
h(r) = f''(r) r^2 computed from each f by finite differences, the weighted DMD gradient, the config's rules,
and the trainer reading the ratio from its GAN head."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_resumes_bit_identically, tiny_distill_config
from training import losses
from training.config import ConfigError
from training.trainer import DMD2Trainer

# Each divergence's f, D_f(p || q) = E_q[f(p / q)], written out from its definition (not from the weights).
F_OF = {
    "reverse-kl": lambda r: -math.log(r),                                     # KL(q || p)
    "forward-kl": lambda r: r * math.log(r),                                  # KL(p || q)
    "js": lambda r: r * math.log(r) - (1 + r) * math.log((1 + r) / 2),        # 2 JS(p, q)
}


def second_derivative(f, r: float, step: float = 1e-3) -> float:
    return (f(r + step) - 2 * f(r) + f(r - step)) / step ** 2


@pytest.mark.parametrize("divergence", sorted(F_OF))
def test_weights_are_f_second_derivative_times_r_squared_up_to_the_batch_mean(divergence):
    ratios = torch.tensor([0.2, 0.7, 1.0, 2.5, 6.0], dtype=torch.float64)
    expected = torch.tensor([second_derivative(F_OF[divergence], r) * r * r for r in ratios.tolist()],
                            dtype=torch.float64)
    expected = expected / expected.mean()
    got = losses.divergence_weights(ratios.log(), divergence).double()
    assert torch.allclose(got, expected, rtol=1e-4), (divergence, got, expected)


def test_weights_favour_what_the_student_under_covers_and_survive_extreme_ratios():
    log_ratio = torch.tensor([-3.0, 0.0, 3.0])   # the data denser than the student's samples at the last one
    for divergence in ("forward-kl", "js"):
        w = losses.divergence_weights(log_ratio, divergence)
        assert w[0] < w[1] < w[2] and w.mean().item() == pytest.approx(1.0)
    assert torch.equal(losses.divergence_weights(log_ratio, "reverse-kl"), torch.ones(3))
    extreme = torch.tensor([-500.0, 0.0, 500.0])  # exp(500) overflows float32; the weights must not
    for divergence in ("forward-kl", "js"):
        w = losses.divergence_weights(extreme, divergence)
        assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0)
    assert losses.divergence_weights(extreme, "forward-kl").tolist() == pytest.approx([0.0, 0.0, 3.0])
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        losses.divergence_weights(log_ratio, "kl")


def test_the_weighted_loss_scales_each_samples_gradient_by_its_weight():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    weights = torch.tensor([0.5, 1.0, 1.5])
    losses.distribution_matching_loss(x, x0_real, x0_fake, weights).backward()
    plain = losses.distribution_matching_grad(x.detach(), x0_real, x0_fake) / x.numel()
    assert torch.allclose(x.grad, plain * weights.view(3, 1, 1, 1), atol=1e-7)
    x.grad = None
    losses.distribution_matching_loss(x, x0_real, x0_fake, torch.ones(3)).backward()
    assert torch.allclose(x.grad, plain, atol=1e-7)


def test_the_config_names_what_another_divergence_needs(setup):
    with pytest.raises(ConfigError, match="dm_divergence='kl'.*reverse-kl, forward-kl, js"):
        tiny_distill_config(setup, dm_divergence="kl")
    with pytest.raises(ConfigError, match="dm_divergence.*gan_critic_weight > 0"):
        tiny_distill_config(setup, dm_divergence="js", gan_critic_weight=0.0, gan_generator_weight=0.0)
    with pytest.raises(ConfigError, match="dm_divergence.*up to t = 980.*gan_max_t = 100"):
        tiny_distill_config(setup, dm_divergence="forward-kl", gan_max_t=100)
    with pytest.raises(ConfigError, match="up to t = 100, .*gan_max_t = 100"):   # t = 100 itself is drawn
        tiny_distill_config(setup, dm_divergence="forward-kl", gan_max_t=100, dm_max_t=0.1)
    with pytest.raises(ConfigError, match="dm_divergence.*dm_weight 0"):
        tiny_distill_config(setup, dm_divergence="js", dm_weight=0.0)
    with pytest.raises(ConfigError, match="dm_divergence.*batch_size must be at least 2"):
        tiny_distill_config(setup, dm_divergence="js", batch_size=1)
    assert tiny_distill_config(setup, dm_divergence="js", gan_max_t=101, dm_max_t=0.1).dm_divergence == "js"
    assert tiny_distill_config(setup, dm_divergence="js", dm_max_t=1.0).gan_max_t == 1000   # t is at most 999


def test_the_trainer_checks_the_noise_levels_against_the_teachers_own_schedule(setup):
    """The config assumes T = 1000; a teacher with another T is checked when the trainer knows it."""
    teacher, _ = setup
    cfg = tiny_distill_config(setup, dm_divergence="js", gan_max_t=990)   # fine for T = 1000 (t <= 980)
    assert DMD2Trainer(cfg).family.schedule.num_train_timesteps == 1000
    scheduler = teacher / "scheduler_config.json"
    scheduler.write_text(json.dumps(dict(json.loads(scheduler.read_text()), num_train_timesteps=2000)))
    with pytest.raises(ConfigError, match="up to t = 1960 of this teacher's 2000.*gan_max_t = 990"):
        DMD2Trainer(cfg)


def _generator_update(setup, monkeypatch, divergence, head_logit=None):
    """One critic and one generator update (TTUR 1) and the weights the DM loss received. With `head_logit` the
    GAN head says that log-ratio for every sample (a discriminator without an opinion)."""
    seen = []
    dm = losses.distribution_matching_loss
    monkeypatch.setattr(losses, "distribution_matching_loss", lambda *a: seen.append(a[3]) or dm(*a))
    trainer = DMD2Trainer(tiny_distill_config(setup, ttur=1, dm_divergence=divergence))
    if head_logit is not None:
        head = trainer.critic_module.gan_head
        head.forward = lambda features: torch.full((len(features),), head_logit) + 0 * features.sum()
    stats = trainer.train_step()
    return trainer, stats, seen


def test_a_discriminator_without_opinion_makes_every_divergence_dmd(setup, monkeypatch):
    """With the same log-ratio for every sample, forward KL and JS weigh all samples alike: the same update as
    DMD's reverse KL (same seed, same head), whatever the constant."""
    plain, _, seen = _generator_update(setup, monkeypatch, "reverse-kl", head_logit=0.0)
    assert seen == [None]
    for divergence, logit in (("forward-kl", 0.0), ("js", 2.0)):
        trainer, stats, seen = _generator_update(setup, monkeypatch, divergence, head_logit=logit)
        assert torch.allclose(seen[0], torch.ones(4))
        assert stats["generator/dm_log_ratio"] == pytest.approx(logit)
        for a, b in zip(plain.generator_module.parameters(), trainer.generator_module.parameters()):
            assert torch.allclose(a, b, atol=1e-6)


def test_the_head_s_opinion_reweights_the_samples_and_changes_the_update(setup, monkeypatch):
    plain, plain_stats, _ = _generator_update(setup, monkeypatch, "reverse-kl")
    trainer, stats, seen = _generator_update(setup, monkeypatch, "forward-kl")
    weights = seen[0]
    assert weights.shape == (4,) and weights.mean().item() == pytest.approx(1.0)
    assert weights.max() > weights.min() and stats["generator/dm_weight_max"] == pytest.approx(weights.max().item())
    # the same critic update, samples and noise (the weights consume no random numbers): only the weights differ
    same = [key for key in plain_stats if key.startswith("critic/") or key == "generator/gan_generator"]
    assert same and all(stats[key] == plain_stats[key] for key in same)
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(plain.generator_module.parameters(),
                                                                    trainer.generator_module.parameters()))


def test_a_run_with_js_trains_logs_and_resumes_bit_identically(setup, tmp_path):
    cfg = tiny_distill_config(setup, dm_divergence="js", iterations=8, checkpoint_every=4, ttur=2)
    straight = assert_resumes_bit_identically(cfg, tmp_path, stop_after=4)
    logged = [r for r in straight.metrics() if "generator/dm_weight_max" in r]
    assert logged and all(math.isfinite(r["generator/dm_log_ratio"]) for r in logged)


def test_the_weights_come_from_the_heads_logit_at_the_dms_own_noisy_samples(setup, monkeypatch):
    seen, calls = [], []
    dm = losses.distribution_matching_loss
    monkeypatch.setattr(losses, "distribution_matching_loss", lambda *a: seen.append(a[3]) or dm(*a))
    trainer = DMD2Trainer(tiny_distill_config(setup, ttur=1, dm_divergence="forward-kl"))
    critic = trainer.critic_module
    fake_x0, bottleneck, head = critic.fake_x0, critic.family.bottleneck, critic.gan_head.forward

    def recorded_head(features):
        logits = head(features)
        calls.append(("logits", logits.detach().clone()))
        return logits

    monkeypatch.setattr(critic, "fake_x0", lambda x_t, *a, **k: calls.append(("fake_x0", x_t.clone())) or fake_x0(x_t, *a, **k))
    monkeypatch.setattr(critic.family, "bottleneck",
                        lambda unet, x_t, *a: calls.append(("bottleneck", x_t.clone())) or bottleneck(unet, x_t, *a))
    monkeypatch.setattr(critic.gan_head, "forward", recorded_head)
    trainer.train_step()
    names = [name for name, _ in calls]
    i = names.index("fake_x0")                  # the generator step's DM term
    assert names[i + 1:i + 3] == ["bottleneck", "logits"]
    assert torch.equal(calls[i + 1][1], calls[i][1])   # the head judges the very samples the two scores denoise
    logits = calls[i + 2][1].float()
    assert torch.allclose(seen[0], 4 * torch.softmax(logits, dim=0))   # forward KL: r / mean(r), r = exp(logit)


def test_a_head_that_says_nan_stops_the_run_naming_the_ratio(setup, monkeypatch):
    from training.trainer import NonFiniteLoss

    trainer = DMD2Trainer(tiny_distill_config(setup, ttur=1, dm_divergence="js"))
    head, count = trainer.critic_module.gan_head.forward, []

    def nan_at_the_third_call(features):   # the critic's update asks twice (fake, real); the DM term next
        count.append(1)
        logits = head(features)
        return logits if len(count) < 3 else logits * float("nan")

    monkeypatch.setattr(trainer.critic_module.gan_head, "forward", nan_at_the_third_call)
    with pytest.raises(NonFiniteLoss, match="log density ratio.*dm_divergence=js.*not finite"):
        trainer.train_step()


def test_weights_are_normalised_over_every_ranks_samples(setup):
    trainer = DMD2Trainer(tiny_distill_config(setup, dm_divergence="forward-kl"))
    other = torch.full((4,), 5.0)            # rank 0's samples: where the data is far denser than the student

    class TwoRanks:
        num_processes, process_index = 2, 1

        def gather(self, tensor):
            return torch.cat([other, tensor])

    trainer.acc = TwoRanks()
    mine = torch.tensor([0.0, 1.0, 2.0, 3.0])
    got = trainer._divergence_weights(mine)
    assert torch.allclose(got, losses.divergence_weights(torch.cat([other, mine]), "forward-kl")[4:])
    assert got.mean() < 0.1                   # against the whole batch this rank's samples weigh little


def test_the_second_pass_benchmark_runs_and_refuses_reverse_kl(setup, tmp_path, monkeypatch, capsys):
    """benchmarks/divergence_pass.py (what the divergence's extra bottleneck pass costs) on a tiny js config."""
    import dataclasses
    import runpy
    import sys

    import yaml

    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def write(name, **overrides):
        cfg = dataclasses.asdict(tiny_distill_config(setup, **overrides))
        path = tmp_path / name
        path.write_text(yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}))
        return str(path)

    script = str(root / "benchmarks" / "divergence_pass.py")
    monkeypatch.setattr(sys, "argv", [script, "--config", write("js.yaml", dm_divergence="js"), "--repeats", "1"])
    runpy.run_path(script, run_name="__main__")
    out = capsys.readouterr().out
    assert "batch 4, js" in out and "second bottleneck pass" in out and "% of training time" in out
    monkeypatch.setattr(sys, "argv", [script, "--config", write("rkl.yaml")])
    with pytest.raises(SystemExit, match="reverse-kl, which has no second pass"):
        runpy.run_path(script, run_name="__main__")
