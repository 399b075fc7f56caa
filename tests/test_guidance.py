"""Guidance-conditioned students (issue 19): the w embedding, the pixel family's w input, the trainer's
per-sample w for the generator, the fake score and the real score, dmd2.json and the registry."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_UNET
from dmd2 import registry
from dmd2.families.base import ModelLoadError
from dmd2.families.pixel import GuidedUNet2DModel, load_pixel_unet
from dmd2.guidance import check_guidance, guidance_embedding, sample_guidance
from dmd2.sampling import student_sample
from training.config import ConfigError, DistillConfig, load_config
from training.distill import distill
from training.trainer import DMD2Trainer


def test_the_embedding_is_diffusers_pipelines_own():
    from diffusers import StableDiffusionXLPipeline

    w = torch.tensor([1.0, 1.5, 2.0, 3.0, 8.0])
    for dim in (256, 64, 7):
        theirs = StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=dim)
        assert torch.allclose(guidance_embedding(w, dim), theirs, atol=1e-6), dim
    assert not torch.allclose(guidance_embedding(torch.tensor([1.0]), 8), guidance_embedding(torch.tensor([1.5]), 8))


def test_guidance_draws_stay_in_range_and_follow_their_law():
    gen = torch.Generator().manual_seed(0)
    u = sample_guidance(20000, 1.0, 4.0, "uniform", gen)
    lu = sample_guidance(20000, 1.0, 4.0, "log_uniform", gen)
    for w in (u, lu):
        assert w.min() >= 1.0 and w.max() <= 4.0
    assert abs(u.mean().item() - 2.5) < 0.03
    assert abs(lu.log().mean().item() - torch.log(torch.tensor(4.0)).item() / 2) < 0.02  # uniform in log w
    assert (lu < 2.0).float().mean() > 0.45 > (u < 2.0).float().mean()  # half of log w below log 2
    again = sample_guidance(5, 1.0, 4.0, "uniform", torch.Generator().manual_seed(3))
    assert torch.equal(again, sample_guidance(5, 1.0, 4.0, "uniform", torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="guidance sampling 'gauss'"):
        sample_guidance(2, 1.0, 2.0, "gauss", gen)


def test_check_guidance_names_the_range():
    assert check_guidance("2.5", (1, 3)) == 2.5
    with pytest.raises(ValueError, match=r"outside student 'x''s range \[1, 3\]"):
        check_guidance(3.5, (1, 3), "student 'x'")
    with pytest.raises(ValueError, match="must be a number"):
        check_guidance("lots", (1, 3))


@torch.no_grad()
def test_a_new_guided_network_computes_exactly_its_source_then_depends_on_w(family, unet, tmp_path):
    guided = family.guidance_conditioned(unet, 16)
    assert isinstance(guided, GuidedUNet2DModel) and guided.config.time_cond_proj_dim == 16
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 500, 999]), torch.tensor([0, 1, 2])
    plain = family.model_output(unet, x, t, y)
    for w in (1.0, 2.0, torch.tensor([1.0, 2.5, 4.0])):
        assert torch.equal(family.model_output(guided, x, t, y, guidance_input=w), plain)
        assert torch.equal(family.bottleneck(guided, x, t, y, guidance_input=w), family.bottleneck(unet, x, t, y))
    torch.nn.init.normal_(guided.time_embedding.cond_proj.weight, std=0.5)
    at_1, at_3 = (family.model_output(guided, x, t, y, guidance_input=w) for w in (1.0, 3.0))
    assert not torch.allclose(at_1, at_3)
    per_sample = family.model_output(guided, x, t, y, guidance_input=torch.tensor([1.0, 3.0, 3.0]))
    assert torch.allclose(per_sample[0], at_1[0], atol=1e-6) and torch.allclose(per_sample[1:], at_3[1:], atol=1e-6)
    # The bottleneck (GAN features) sees w too.
    assert not torch.allclose(family.bottleneck(guided, x, t, y, guidance_input=1.0),
                              family.bottleneck(guided, x, t, y, guidance_input=3.0))
    with pytest.raises(ValueError, match="guidance-conditioned: give it a guidance scale"):
        family.model_output(guided, x, t, y)
    with pytest.raises(ValueError, match="not guidance-conditioned"):
        family.model_output(unet, x, t, y, guidance_input=2.0)
    with pytest.raises(ValueError, match="already guidance-conditioned"):
        family.guidance_conditioned(guided, 16)
    # A diffusers folder that records time_cond_proj_dim; our loader gives the guided class back, same outputs.
    family.save_student(guided, tmp_path / "g", timesteps=[999], guidance_range=[1, 3])
    assert json.loads((tmp_path / "g" / "config.json").read_text())["time_cond_proj_dim"] == 16
    back = load_pixel_unet(tmp_path / "g")
    assert isinstance(back, GuidedUNet2DModel)
    assert torch.equal(family.model_output(back, x, t, y, guidance_input=3.0), at_3)


@torch.no_grad()
def test_cfg_with_one_scale_per_sample_equals_each_scale_alone(family, unet):
    x, t, y = torch.randn(3, 1, 8, 8), 400, torch.tensor([0, 1, 2])
    w = torch.tensor([1.0, 2.0, 3.5])
    both = family.denoise(unet, x, t, y, guidance=w)
    for i in range(3):
        alone = family.denoise(unet, x[i:i + 1], t, y[i:i + 1], guidance=float(w[i]))
        assert torch.allclose(both[i:i + 1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="not through CFG"):
        family.denoise(family.guidance_conditioned(unet, 8), x, t, y, guidance=2.0, guidance_input=2.0)


def guided_config(setup, **overrides) -> DistillConfig:
    teacher, data = setup
    base = dict(teacher=str(teacher), data=str(data), batch_size=4, iterations=10, ttur=5, warmup_steps=2,
                log_every=1, sample_every=0, eval_every=0, checkpoint_every=5, mixed_precision="no",
                generator_lr=1e-3, critic_lr=1e-3, guidance_range=[1.0, 3.0], guidance_embed_dim=16)
    base.update(overrides)
    return DistillConfig(**base).validate()


def test_the_generator_and_the_fake_score_both_learn_to_use_w(setup):
    tr = DMD2Trainer(guided_config(setup))
    gen, fake = tr.generator_module, tr.critic_module.fake_unet
    assert isinstance(gen, GuidedUNet2DModel) and isinstance(fake, GuidedUNet2DModel)
    assert not isinstance(tr.real_unet, GuidedUNet2DModel)   # the teacher takes w through CFG
    for net in (gen, fake):
        assert not net.time_embedding.cond_proj.weight.any()  # zero at the start: exactly the teacher
    for _ in range(10):
        tr.train_step()
    for net in (gen, fake):
        assert net.time_embedding.cond_proj.weight.abs().sum() > 0
    fam, x = tr.family, torch.randn(2, 1, 8, 8)
    y, t = torch.tensor([0, 1]), torch.tensor([999, 999])
    with torch.no_grad():
        for net in (gen, fake):
            assert not torch.allclose(fam.denoise(net, x, t, y, guidance_input=1.0),
                                      fam.denoise(net, x, t, y, guidance_input=3.0))


def test_the_real_score_uses_cfg_at_each_samples_w(setup, monkeypatch):
    tr = DMD2Trainer(guided_config(setup, ttur=1))
    seen = {}
    denoise = type(tr.family).denoise

    def spy(self, unet, x_t, t, cond, guidance=1.0, guidance_input=None):
        if unet is tr.real_unet:
            seen["real"] = guidance
        elif guidance_input is not None:
            seen.setdefault("inputs", []).append(guidance_input)
        return denoise(self, unet, x_t, t, cond, guidance, guidance_input)

    monkeypatch.setattr(type(tr.family), "denoise", spy)
    tr.train_step()
    w = seen["real"]
    assert isinstance(w, torch.Tensor) and w.shape == (4,) and ((1 <= w) & (w <= 3)).all() and w.unique().numel() == 4
    # The generator's sample and the fake score's estimate of it take the same per-sample w as the real score.
    assert any(torch.equal(g, w) for g in seen["inputs"])


def test_a_guided_generator_can_start_from_a_plain_student(setup, tmp_path, family):
    teacher, _ = setup
    torch.manual_seed(5)
    plain = family.new_unet(**TINY_UNET)
    family.save_student(plain, tmp_path / "plain", timesteps=[999])
    tr = DMD2Trainer(guided_config(setup, generator_init=str(tmp_path / "plain")))
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    with torch.no_grad():
        want = family.denoise(plain, x, 999, y)
        for w in (1.0, 2.7):
            assert torch.equal(family.denoise(tr.generator_module, x, 999, y, guidance_input=w), want)


def test_a_finished_guided_run_records_its_range_and_samples_at_any_w_inside(setup, tmp_path):
    run = distill(guided_config(setup, real_guidance=2.0, ema_decay=0.0, iterations=20), tmp_path / "run")
    meta = json.loads((run.student / "dmd2.json").read_text())
    assert meta["guidance_range"] == [1.0, 3.0] and meta["guidance_default"] == 2.0
    assert meta["guidance_sampling"] == "uniform"
    model = registry.LoadedModel(registry.spec_for(str(run.student)))
    assert model.guided and model.guidance_range == (1.0, 3.0)
    default = model.generate([0, 1], seed=3)
    assert default.extra["guidance"] == 2.0
    assert (model.generate([0, 1], seed=3, guidance=2.0).images == default.images).all()
    assert (model.generate([0, 1], seed=3, guidance=1.0).images != default.images).any()
    with pytest.raises(ValueError, match=r"outside .*range \[1, 3\]"):
        model.generate([0, 1], seed=3, guidance=5.0)
    # The same images as the sampler called by hand with that w.
    fam = model.family
    noise = torch.randn(fam.latent_shape(2), generator=torch.Generator().manual_seed(3))
    x = student_sample(fam, model.unet, fam.condition([0, 1]), noise, [999], seed=3, guidance_input=1.0)
    from dmd2.images import to_uint8
    assert (to_uint8(fam.decode(x)) == model.generate([0, 1], seed=3, guidance=1.0).images).all()
    # dmd2.json and the network must agree on whether w is an input.
    meta.pop("guidance_range")
    (run.student / "dmd2.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="disagree on whether it takes a guidance scale"):
        registry.LoadedModel(registry.spec_for(str(run.student)))


@pytest.mark.parametrize("override, message", [
    ("guidance_range=[3, 1]", "guidance_range=.*0 <= w_min < w_max"),
    ("guidance_range=[1]", "guidance_range=.*w_min, w_max"),
    ("guidance_range=[1, .inf]", "guidance_range"),
    ("guidance_range=two", "guidance_range"),
    ("guidance_sampling=normal", "guidance_sampling='normal'"),
    ("real_guidance=5", r"real_guidance=5.0.*default w.*\[1, 3\]"),
])
def test_bad_guidance_settings_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["guidance_range=[1, 3]", override])


def test_log_uniform_needs_a_positive_minimum_and_lora_is_refused():
    with pytest.raises(ConfigError, match="log_uniform needs guidance_range"):
        load_config(None, ["guidance_range=[0, 3]", "guidance_sampling=log_uniform", "real_guidance=1"])
    with pytest.raises(ConfigError, match="lora_rank: 0"):
        DistillConfig(family="sdxl", data="x", eval_every=0, lora_rank=4, guidance_range=[2, 8],
                      real_guidance=8.0).validate()


# --- real_guidance_above: another real-score w at the high DM noise levels only ------------------------------


def test_real_guidance_above_sets_the_scale_by_each_samples_noise_level(setup, monkeypatch):
    tr = DMD2Trainer(guided_config(setup, ttur=1, batch_size=16, guidance_range=None, real_guidance=1.0,
                                   real_guidance_above=[500, 0.5]))
    seen = {}
    denoise = type(tr.family).denoise

    def spy(self, unet, x_t, t, cond, guidance=1.0, guidance_input=None):
        if unet is tr.real_unet:
            seen["w"], seen["t"] = guidance, t
        return denoise(self, unet, x_t, t, cond, guidance, guidance_input)

    monkeypatch.setattr(type(tr.family), "denoise", spy)
    tr.train_step()
    w, t = seen["w"], seen["t"]
    assert isinstance(w, torch.Tensor) and w.shape == (16,) and t.shape == (16,)
    assert torch.equal(w, torch.where(t >= 500, 0.5, 1.0))
    assert (t >= 500).any() and (t < 500).any()            # both kinds drawn in this batch (seeded)


def test_real_guidance_above_at_the_same_w_changes_nothing(setup):
    """[t, real_guidance] is the plain real score: the same update, bit for bit (w = 1 everywhere takes no CFG pass)."""
    states = []
    for extra in ({}, {"real_guidance_above": [500, 1.0]}):
        tr = DMD2Trainer(guided_config(setup, ttur=1, guidance_range=None, real_guidance=1.0, **extra))
        for _ in range(3):
            tr.train_step()
        states.append(torch.cat([p.detach().flatten() for p in tr.generator_module.parameters()]))
    assert torch.equal(*states)


def test_real_guidance_above_moves_the_update(setup):
    states = []
    for above in ([500, 1.0], [500, 0.2]):
        tr = DMD2Trainer(guided_config(setup, ttur=1, guidance_range=None, real_guidance=1.0, real_guidance_above=above))
        for _ in range(3):
            tr.train_step()
        states.append(torch.cat([p.detach().flatten() for p in tr.generator_module.parameters()]))
    assert not torch.allclose(*states)


@pytest.mark.parametrize("override, message", [
    ("real_guidance_above=[500]", r"real_guidance_above=\[500\].*\[t, w\]"),
    ("real_guidance_above=[0, 0.8]", r"real_guidance_above.*t an integer timestep in 1..999"),
    ("real_guidance_above=[1000, 0.8]", r"real_guidance_above.*1..999"),
    ("real_guidance_above=[500.5, 0.8]", r"real_guidance_above.*integer"),
    ("real_guidance_above=[500, -1]", r"real_guidance_above.*w >= 0"),
    ("real_guidance_above=[500, .nan]", r"real_guidance_above"),
    ("real_guidance_above=high", r"real_guidance_above"),
])
def test_bad_real_guidance_above_is_refused_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_real_guidance_above_is_refused_where_it_cannot_act(setup):
    with pytest.raises(ConfigError, match="real_guidance_above.*guidance-conditioned"):
        load_config(None, ["guidance_range=[1, 3]", "real_guidance_above=[500, 0.8]"])
    with pytest.raises(ConfigError, match="real_guidance_above.*dm_weight 0"):
        load_config(None, ["dm_weight=0", "real_guidance_above=[500, 0.8]"])
    with pytest.raises(ConfigError, match=r"real_guidance_above=\[990, 0.8\].*split the DM term's noise levels 20..980"):
        DMD2Trainer(guided_config(setup, guidance_range=None, real_guidance_above=[990, 0.8]))


def test_real_guidance_above_boundaries(setup):
    """w' from t itself up; the trainer accepts a t that splits the DM levels and refuses one at their bottom."""
    tr = DMD2Trainer(guided_config(setup, guidance_range=None, real_guidance=1.5, real_guidance_above=[500, 0.5]))
    assert tr._real_guidance(torch.tensor([20, 499, 500, 501, 980]), None).tolist() == [1.5, 1.5, 0.5, 0.5, 0.5]
    assert tr._real_guidance(torch.tensor([20, 980]), torch.tensor([2.0, 3.0])).tolist() == [2.0, 3.0]   # guided: w
    DMD2Trainer(guided_config(setup, guidance_range=None, real_guidance_above=[980, 0.5]))      # the top DM level
    with pytest.raises(ConfigError, match="split the DM term's noise levels 20..980"):
        DMD2Trainer(guided_config(setup, guidance_range=None, real_guidance_above=[20, 0.5]))   # covers them all


def test_real_guidance_above_is_refused_with_flux_pairs_and_past_the_apps_bounds(tmp_path):
    from training.launch_limits import LaunchRefused, check_launch

    with pytest.raises(ConfigError, match="real_guidance_above.*FLUX"):
        DistillConfig(family="flux", data="x", eval_every=0, real_guidance_above=[500, 0.8]).validate()
    with pytest.raises(ConfigError, match="real_guidance_above.*regression_weight: 0"):
        load_config(None, ["regression_weight=0.25", "regression_pairs=x.npz", "real_guidance_above=[500, 0.8]"])
    cfg = load_config(None, ["real_guidance_above=[500, 25]"])
    with pytest.raises(LaunchRefused, match=r"real_guidance_above=\[500, 25\].*outside the app's bounds 0..20"):
        check_launch(cfg, tmp_path, {"pixel"})
