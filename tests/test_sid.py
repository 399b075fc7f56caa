"""Score identity distillation's generator loss (`dm_loss: sid`, Zhou et al. 2024): the formula on hand-computed
values, its gradient against DMD's where the denoisers are held fixed and against a hand derivation where they
depend on the generator's output, the config's rules, and the trainer sending the gradient through both scores
without touching their weights."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_resumes_bit_identically, tiny_distill_config
from training import losses
from training.config import ConfigError
from training.trainer import DMD2Trainer, NonFiniteLoss


def test_the_loss_on_hand_computed_values():
    # one sample, two pixels: weight = mean|x - x0_real| = (1 + 2) / 2 = 1.5; d = x0_real - x0_fake = (-0.5, 1);
    # (1 - 1.2) d^2 = (-0.05, -0.2); d * (x0_fake - x) = (0.25, -3); sum / 1.5 = (0.1333, -2.1333); mean -1
    x, real, fake = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.0]])
    assert losses.score_identity_loss(x, real, fake, alpha=1.2).item() == pytest.approx(-1.0)
    # alpha = 1: only d . (x0_fake - x) = (0.25, -3) / 1.5, mean -0.91667
    assert losses.score_identity_loss(x, real, fake, alpha=1.0).item() == pytest.approx(-2.75 / 3)
    # each sample has its own weight: a second sample scaled by 10 has weight 15 and a loss 10 times the first's
    two = losses.score_identity_loss(torch.cat([x, 10 * x]), torch.cat([real, 10 * real]),
                                     torch.cat([fake, 10 * fake]), alpha=1.2)
    assert two.item() == pytest.approx((-1.0 + -10.0) / 2)


def test_with_the_denoisers_held_fixed_the_gradient_is_dmds():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    losses.distribution_matching_loss(x, real, fake).backward()
    dmd = x.grad.clone()
    for alpha in (0.0, 1.2):   # alpha weighs |d|^2, which does not depend on x when the denoisers are fixed
        x.grad = None
        losses.score_identity_loss(x, real, fake, alpha).backward()
        assert torch.allclose(x.grad, dmd, atol=1e-7), alpha


def test_through_denoisers_that_read_x_the_gradient_is_the_hand_derived_one():
    """Denoisers linear in their noisy input n = a x + s e (real p n, fake q n): per element
    l = (1 - alpha) d^2 + d (f - x), d = (p - q) n, so dl/dx = 2 (1 - alpha) d (p - q) a + (p - q) a (f - x)
    + d (q a - 1), divided by the sample's weight mean|x - r| (held fixed) and the element count."""
    torch.manual_seed(1)
    a, s, p, q, alpha = 0.8, 0.6, 0.9, 0.5, 1.2
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    e = torch.randn_like(x)
    n = a * x + s * e
    real, fake = p * n, q * n
    losses.score_identity_loss(x, real, fake, alpha).backward()
    with torch.no_grad():
        n, real, fake = a * x + s * e, p * (a * x + s * e), q * (a * x + s * e)
        d = (p - q) * n
        dl = 2 * (1 - alpha) * d * (p - q) * a + (p - q) * a * (fake - x) + d * (q * a - 1)
        weight = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = dl / weight / x.numel()
    assert torch.allclose(x.grad.double(), expected.float().double(), rtol=1e-5, atol=1e-9)
    # and it is not DMD's: the terms through the denoisers are there
    assert not torch.allclose(x.grad, losses.distribution_matching_grad(x.detach(), real, fake).double() / x.numel())


def test_equal_scores_give_no_loss_and_no_gradient():
    torch.manual_seed(2)
    x = torch.randn(2, 1, 4, 4, requires_grad=True)
    e = torch.randn_like(x)
    score = lambda n: torch.tanh(0.7 * n) + 0.1 * n   # the fake score has caught up with the real one
    loss = losses.score_identity_loss(x, score(0.9 * x + 0.4 * e), score(0.9 * x + 0.4 * e), alpha=1.2)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0


def test_the_config_names_what_sid_needs(setup):
    with pytest.raises(ConfigError, match="dm_loss='fisher'.*dmd, sid"):
        tiny_distill_config(setup, dm_loss="fisher")
    with pytest.raises(ConfigError, match="dm_loss='sid'.*dm_weight 0.*set dm_weight > 0, or dm_loss: dmd"):
        tiny_distill_config(setup, dm_loss="sid", dm_weight=0.0)
    with pytest.raises(ConfigError, match="dm_loss='sid'.*dm_divergence='js'"):
        tiny_distill_config(setup, dm_loss="sid", dm_divergence="js")
    with pytest.raises(ConfigError, match="dm_loss='sid'.*dm_divergence='js'"):   # named first, not the GAN's rule
        tiny_distill_config(setup, dm_loss="sid", dm_divergence="js", gan_critic_weight=0.0, gan_generator_weight=0.0)
    for bad in (-0.1, math.nan, math.inf, True, "1.2"):
        with pytest.raises(ConfigError, match="sid_alpha=.*must be a number >= 0"):
            tiny_distill_config(setup, dm_loss="sid", sid_alpha=bad)
    with pytest.raises(ConfigError, match="sid_alpha=0.5.*does not use: set dm_loss: sid"):
        tiny_distill_config(setup, sid_alpha=0.5)
    assert tiny_distill_config(setup, dm_loss="sid", sid_alpha=1.0).sid_alpha == 1.0


def _one_update(setup, monkeypatch, **overrides):
    """One critic and one generator update (TTUR 1); what the DM loss, the two denoisers and the fake score
    received during the generator update."""
    seen, calls = [], []
    for name in ("score_identity_loss", "distribution_matching_loss"):
        original = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _f=original, _n=name: seen.append((_n, a)) or _f(*a))
    trainer = DMD2Trainer(tiny_distill_config(setup, ttur=1, **overrides))
    denoise, fake_x0 = trainer.family.denoise, trainer.critic_module.fake_x0

    def recorded_denoise(unet, x_t, t, cond, **k):
        if unet is trainer.real_unet:
            calls.append(("real", x_t, t, k.get("guidance")))
        return denoise(unet, x_t, t, cond, **k)

    monkeypatch.setattr(trainer.family, "denoise", recorded_denoise)
    monkeypatch.setattr(trainer.critic_module, "fake_x0",
                        lambda x_t, t, *a, **k: calls.append(("fake", x_t, t, None)) or fake_x0(x_t, t, *a, **k))
    before = [p.detach().clone() for p in trainer.real_unet.parameters()]
    stats = trainer.train_step()
    return trainer, stats, seen, before, calls


def test_the_trainer_sends_the_gradient_through_both_scores_and_trains_neither(setup, monkeypatch):
    trainer, stats, seen, before, calls = _one_update(setup, monkeypatch, dm_loss="sid", sid_alpha=0.5)
    assert [name for name, _ in seen] == ["score_identity_loss"]
    x, real, fake, alpha = seen[0][1]
    assert alpha == 0.5 and x.requires_grad and real.requires_grad and fake.requires_grad   # not detached
    # the two scores read one noisy copy of x at one t (the critic's own update calls fake_x0 first), the
    # teacher at the real score's CFG scale
    (_, x_real, t_real, w), (_, x_fake, t_fake, _) = calls[-2:]
    assert [c[0] for c in calls[-2:]] == ["real", "fake"] and w == 2.0
    assert x_real is x_fake and torch.equal(t_real, t_fake) and x_real.requires_grad
    assert stats["generator/dm_score_gap"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.real_unet.parameters()))
    assert all(p.grad is None and not p.requires_grad for p in trainer.real_unet.parameters())
    # the critic's weights got no gradient from the generator's update, and train again afterwards
    critic = trainer.critic_module
    assert all(p.grad is None for p in critic.parameters()) and all(p.requires_grad for p in critic.parameters())
    # DMD's surrogate, for contrast: the scores come from no-grad passes
    plain, _, seen, _, _ = _one_update(setup, monkeypatch)
    assert [name for name, _ in seen[-1:]] == ["distribution_matching_loss"]
    _, real, fake, _ = seen[-1][1]
    assert not real.requires_grad and not fake.requires_grad


def test_sid_and_dmd_make_different_updates_from_the_same_start(setup):
    sid = DMD2Trainer(tiny_distill_config(setup, ttur=1, dm_loss="sid"))
    dmd = DMD2Trainer(tiny_distill_config(setup, ttur=1))
    sid.train_step(), dmd.train_step()
    assert any(not torch.allclose(a, b, atol=1e-7) for a, b in zip(sid.generator_module.parameters(),
                                                                    dmd.generator_module.parameters()))


def test_gradient_checkpointing_reaches_the_teacher_only_where_sid_backpropagates_through_it(setup):
    sid = DMD2Trainer(tiny_distill_config(setup, dm_loss="sid", gradient_checkpointing=True))
    dmd = DMD2Trainer(tiny_distill_config(setup, gradient_checkpointing=True))
    assert sid.real_unet.is_gradient_checkpointing and not dmd.real_unet.is_gradient_checkpointing
    assert sid.generator_module.is_gradient_checkpointing and sid.critic_module.fake_unet.is_gradient_checkpointing
    sid.train_step()


def test_a_run_with_sid_trains_logs_and_resumes_bit_identically(setup, tmp_path):
    cfg = tiny_distill_config(setup, dm_loss="sid", iterations=8, checkpoint_every=4, ttur=2)
    straight = assert_resumes_bit_identically(cfg, tmp_path, stop_after=4)
    logged = [r for r in straight.metrics() if "generator/dm_score_gap" in r]
    assert logged and all(math.isfinite(r["generator/dm"]) for r in logged)


def test_a_nan_from_the_teacher_stops_the_run_naming_the_dm_loss(setup, monkeypatch):
    trainer = DMD2Trainer(tiny_distill_config(setup, ttur=1, dm_loss="sid"))
    denoise = trainer.family.denoise

    def nan_teacher(unet, *a, **k):
        out = denoise(unet, *a, **k)
        return out * float("nan") if unet is trainer.real_unet else out

    monkeypatch.setattr(trainer.family, "denoise", nan_teacher)
    with pytest.raises(NonFiniteLoss, match="loss dm is nan"):
        trainer.train_step()
