"""Guidance-conditioned SD students (issue 19) on tiny random SDXL / SD1.5 pipelines: the generator and the fake
score start as the teacher at any w and learn to use w; the export is a diffusers UNet with time_cond_proj_dim
plus dmd2.json's guidance range; plain diffusers with `guidance_scale=w` (no CFG pass) gives our sampler's
latents; the SDXL preset; the model card; LoRA refused."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

import tiny_sd
from conftest import make_caption_folder
from dmd2 import registry
from dmd2.images import to_uint8
from dmd2.sampling import initial_noise, renoise_seed, student_sample
from training.config import ConfigError, DistillConfig, list_presets, load_config
from training.distill import distill
from training.simulate import backward_simulate
from training.trainer import DMD2Trainer

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "sdxl-4step-guided.yaml"
PROMPTS = ["a photo of a cat", "a red dog"]
RANGE = [2.0, 8.0]
SEED = 7


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts with empty model and family caches."""
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SDXL and SD1.5 pipelines, a captioned image folder, a prompt file, latent cache folders."""
    root = tmp_path_factory.mktemp("guided-sd")
    (root / "prompts.txt").write_text("a photo of a dog\na blue cat\na red photo\n")
    return {"root": root, "sdxl": tiny_sd.make_tiny_sdxl(root / "sdxl"), "sd15": tiny_sd.make_tiny_sd15(root / "sd15"),
            "data": make_caption_folder(root / "data"), "prompts": root / "prompts.txt"}


def tiny_overrides(world, family="sdxl") -> dict:
    """What shrinks a run to the tiny pipeline and two iterations; lr 1e-3 so that two updates visibly move w's projection."""
    return dict(teacher=str(world[family]), data=str(world["data"]), prompts=str(world["prompts"]),
                latent_cache_dir=str(world["root"] / f"cache-{family}"), resolution=16, batch_size=2, iterations=2,
                ttur=1, warmup_steps=1, log_every=1, sample_every=2, eval_every=0, checkpoint_every=0,
                generator_lr=1e-3, critic_lr=1e-3)


def guided_config(world, family="sdxl", **overrides) -> DistillConfig:
    """A guided 1-step student (SDXL at t=399 as the official 1-step) with a small w embedding."""
    base = dict(family=family, student_steps=1, first_timestep=399 if family == "sdxl" else None, mixed_precision="no",
                ema_decay=0.0, guidance_range=RANGE, guidance_embed_dim=16, real_guidance=5.0, gan_generator_weight=5e-3,
                **tiny_overrides(world, family))
    base.update(overrides)
    return DistillConfig(**base).validate()


def preset_config(world) -> DistillConfig:
    """configs/sdxl-4step-guided.yaml as it is (4 steps, backward simulation, bf16, the official GAN head,
    a 256-wide w embedding), only shrunk to the tiny pipeline."""
    return load_config(PRESET, [f"{k}={v}" for k, v in tiny_overrides(world).items()])


@pytest.fixture(scope="module")
def runs(world):
    """Finished two-iteration guided runs: SDXL 1-step, SDXL 4-step (the preset) and SD1.5 1-step."""
    out = world["root"] / "runs"
    return {"sdxl-1step": distill(guided_config(world), out / "sdxl-1step"),
            "sdxl-4step": distill(preset_config(world), out / "sdxl-4step"),
            "sd15-1step": distill(guided_config(world, family="sd15"), out / "sd15-1step")}


def probe(fam, n=2):
    """Noisy latents at a high and a low t, and two prompts' conditioning."""
    return initial_noise(fam, n, seed=3), torch.tensor([999, 399])[:n], fam.condition(PROMPTS[:n])


# --- (a) the networks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@torch.no_grad()
def test_at_init_the_generator_and_the_fake_score_are_exactly_the_teacher_at_any_w(world, family):
    tr = DMD2Trainer(guided_config(world, family=family))
    fam, teacher = tr.family, tr.real_unet
    gen, fake = tr.generator_module, tr.critic_module.fake_unet
    assert teacher.config.time_cond_proj_dim is None  # the teacher takes w through CFG
    x, t, cond = probe(fam)
    # The generator an unguided run starts from (a trainable copy of the teacher: requires_grad alone changes
    # CPU float rounding in the last bit, so the frozen teacher itself is not the bit-exact reference).
    same = copy.deepcopy(teacher).train().requires_grad_(True)
    plain, plain_bottleneck = fam.model_output(same, x, t, cond), fam.bottleneck(same, x, t, cond)
    torch.testing.assert_close(plain, fam.model_output(teacher, x, t, cond), atol=1e-5, rtol=1e-5)
    for net in (gen, fake):
        assert isinstance(net, UNet2DConditionModel) and net.config.time_cond_proj_dim == 16
        assert net.dtype == torch.float32 and not net.time_embedding.cond_proj.weight.any()
        for w in (2.0, 8.0, torch.tensor([2.0, 7.5])):
            assert torch.equal(fam.model_output(net, x, t, cond, guidance_input=w), plain)
            assert torch.equal(fam.bottleneck(net, x, t, cond, guidance_input=w), plain_bottleneck)
    with pytest.raises(ValueError, match="guidance-conditioned: give it a guidance scale"):
        fam.model_output(gen, x, t, cond)
    with pytest.raises(ValueError, match="not guidance-conditioned"):
        fam.model_output(teacher, x, t, cond, guidance_input=2.0)
    with pytest.raises(ValueError, match="already guidance-conditioned"):
        fam.guidance_conditioned(gen, 16)


@pytest.mark.parametrize("name", ["sdxl-1step", "sdxl-4step", "sd15-1step"])
def test_a_guided_run_trains_both_networks_to_use_w(runs, name):
    run = runs[name]
    tr = run.trainer
    assert tr.generator_updates == 2 and tr.timesteps == {"sdxl-1step": [399], "sdxl-4step": [999, 749, 499, 249],
                                                          "sd15-1step": [999]}[name]
    if name == "sdxl-4step":
        assert tr.cfg.backward_simulation and tr.cfg.frozen_dtype == "bf16" and tr.cfg.gan_head == "official"
    last = run.metrics()[-1]
    assert {"generator/dm", "generator/gan_generator", "critic/fake_denoise", "critic/gan_critic"} <= set(last)
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
    assert (run.samples / "latest.png").is_file()
    fam = tr.family
    x, t, cond = probe(fam)
    for net in (tr.generator_module, tr.critic_module.fake_unet):
        assert net.time_embedding.cond_proj.weight.abs().sum() > 0   # left zero: the network learnt nothing about w
        with torch.no_grad():
            low, high = (fam.denoise(net, x, t, cond, guidance_input=w) for w in RANGE)
        assert (low - high).abs().max() > 1e-3
    if len(tr.timesteps) > 1:  # backward simulation runs the student's own first steps at the sample's w
        with torch.no_grad():
            low, high = (backward_simulate(fam, tr.generator_module, cond, tr.timesteps, 3, x,
                                           torch.Generator().manual_seed(1), guidance_input=w) for w in RANGE)
        assert (low - high).abs().max() > 1e-3


# --- (b) the export and its card --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sdxl-1step", "sdxl-4step", "sd15-1step"])
def test_the_export_is_a_diffusers_unet_with_time_cond_proj_dim_and_dmd2_json_records_the_range(runs, name):
    run = runs[name]
    tr = run.trainer
    config = json.loads((run.student / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    assert config["time_cond_proj_dim"] == tr.cfg.guidance_embed_dim == (256 if name == "sdxl-4step" else 16)
    meta = json.loads((run.student / "dmd2.json").read_text())
    default = tr.cfg.real_guidance
    assert (meta["guidance_range"], meta["guidance_default"], meta["guidance_sampling"]) == (RANGE, default, "uniform")
    assert meta["timesteps"] == tr.timesteps
    plain = UNet2DConditionModel.from_pretrained(run.student)  # plain diffusers
    ours = tr.student().state_dict()
    assert ours.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(ours[k], v), k

    card = (run.student / "MODEL_CARD.md").read_text()
    assert f"guidance_scale={default:g}).images[0]  # any w in [2, 8]" in card and "guidance_scale=0" not in card
    assert f"- guidance: conditioned on the guidance scale w in [2, 8] (default {default:g}; w drawn uniform" in card
    assert "real-score CFG at each sample's w in [2, 8]" in card
    assert f"timesteps={tr.timesteps}" in card and "UNet2DConditionModel.from_pretrained" in card


# --- (c) plain diffusers against our sampler --------------------------------------------------------------------
def plain_pipeline(world, family, student):
    """The teacher's pipeline from its folder with the exported UNet, as the model card says, with LCMScheduler;
    every UNet call is recorded (batch size, whether timestep_cond was given)."""
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(world[family], unet=UNet2DConditionModel.from_pretrained(student), **extra)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.calls = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: pipe.calls.append((args[0].shape[0], kwargs.get("timestep_cond") is not None)),
        with_kwargs=True)
    return pipe


def plain_latents(pipe, timesteps, w, noise, seed=None):
    """Plain diffusers' final latents at guidance_scale=w; its generator draws only LCMScheduler's re-noising noise
    (the starting latents are given)."""
    pipe.calls.clear()
    return pipe(prompt=PROMPTS, timesteps=list(timesteps), guidance_scale=w, latents=noise.clone(), height=16,
                width=16, generator=torch.Generator().manual_seed(renoise_seed(SEED) if seed is None else seed),
                output_type="latent").images


@pytest.mark.parametrize("name", ["sdxl-1step", "sdxl-4step", "sd15-1step"])
def test_plain_diffusers_with_guidance_scale_w_gives_our_samplers_latents(world, runs, name):
    """diffusers 0.42 (pipeline_stable_diffusion(_xl).py): `do_classifier_free_guidance` is `guidance_scale > 1 and
    unet.config.time_cond_proj_dim is None`, and with time_cond_proj_dim it passes
    `get_guidance_scale_embedding(guidance_scale - 1)` as timestep_cond: one UNet call per step, batch unchanged.

    Both samplers are compared over whole trajectories, 4-step included: with the starting latents given, the
    pipeline's generator serves only LCMScheduler.step's re-noising, `torch.randn(shape, generator=g)` on the CPU,
    the same draws in the same order as student_sample's generator seeded with the same seed. LCM's boundary
    scalings differ from plain x0 by < 5e-8 at t >= 249 (test_sdxl.py), so agreement is to float rounding."""
    run = runs[name]
    family = name.split("-")[0]
    model = registry.LoadedModel(registry.spec_for(str(run.student)))   # the inference side, from the folder
    assert model.guided and model.guidance_range == (2.0, 8.0) and model.guidance_default == run.trainer.cfg.real_guidance
    fam, timesteps = model.family, model.timesteps
    pipe = plain_pipeline(world, family, run.student)
    noise = initial_noise(fam, len(PROMPTS), SEED)
    ours = {}
    for w in (2.0, 5.5, 8.0):
        # generate(seed=SEED) re-noises from renoise_seed(SEED), the stream the pipeline's generator gets here
        ours[w] = student_sample(fam, model.unet, fam.condition(PROMPTS), noise, list(timesteps),
                                 seed=renoise_seed(SEED), guidance_input=w)
        theirs = plain_latents(pipe, timesteps, w, noise)
        assert not pipe.do_classifier_free_guidance                        # w > 1, yet no CFG: w is an input
        assert pipe.calls == [(len(PROMPTS), True)] * len(timesteps)     # one call per step, batch 2, w given
        diff = (ours[w] - theirs).abs().max().item()
        print(f"{name} w={w:g}: max |ours - diffusers| = {diff:.3g} (latents up to {ours[w].abs().max():.3g})")
        # x0 at t=999 divides eps by sqrt(alphas_cumprod) = 0.068: float rounding reaches a few 1e-5 there.
        torch.testing.assert_close(ours[w], theirs, atol=1e-4, rtol=1e-5)
        # The registry's generate (the app, python -m dmd2 sample) samples the same latents at that w.
        out = model.generate(PROMPTS, seed=SEED, guidance=w)
        assert out.extra["guidance"] == w and out.nfe == len(timesteps)
        assert (out.images == to_uint8(fam.decode(ours[w]))).all()
    for a, b in ((2.0, 5.5), (5.5, 8.0)):
        apart = (ours[a] - ours[b]).abs().max().item()
        print(f"{name}: max |latents at w={a:g} - at w={b:g}| = {apart:.3g}")
        assert apart > 1e-3    # different w, different latents (far above the rounding)
    if len(timesteps) > 1:  # the re-noising noise matters, so matching it was part of the check
        assert (plain_latents(pipe, timesteps, 8.0, noise, seed=renoise_seed(SEED) + 1) - ours[8.0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"outside .*range \[2, 8\]"):
        model.generate(PROMPTS, seed=SEED, guidance=9.0)


# --- (e) LoRA is refused, (2) the preset ------------------------------------------------------------------------------
def test_a_lora_guided_config_is_refused_by_the_cli_and_by_the_trainer(world, tmp_path, monkeypatch, capsys):
    from training.__main__ import main

    monkeypatch.setattr(sys, "argv", ["python -m training", "distill", "--config", str(PRESET), "--out",
                                      str(tmp_path / "run"), "--set", "lora_rank=64"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "guidance_range" in err and "lora_rank: 0" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    unchecked = dataclasses.replace(guided_config(world), lora_rank=4)  # validate() not called
    with pytest.raises(ConfigError, match="generator's w projection would stay zero"):
        DMD2Trainer(unchecked)


def test_the_guided_sdxl_preset_is_sdxl_4step_plus_a_guidance_range_and_is_gpu_only():
    cfg, plain = load_config(PRESET), load_config(ROOT / "configs" / "sdxl-4step.yaml")
    header = PRESET.read_text().split("\nfamily:")[0]
    assert "training distill" in header and "GiB" in header and "Why [2, 8]" in header
    assert (cfg.guidance_range, cfg.real_guidance, cfg.guidance_sampling, cfg.guidance_embed_dim) == (RANGE, 8.0,
                                                                                                   "uniform", 256)
    changed = {k for k, v in cfg.__dict__.items() if plain.__dict__[k] != v}
    assert changed == {"guidance_range"}  # everything else as the official 4-step run
    assert "sdxl-4step-guided" in list_presets(cuda=True) and "sdxl-4step-guided" not in list_presets(cuda=False)


def test_the_students_weight_file_alone_is_the_same_guided_student(runs):
    """A registry name may be the weight file beside dmd2.json: it loads with the w projection, and the range comes
    from the file's folder."""
    student = runs["sdxl-1step"].student
    by_file = registry.LoadedModel(registry.spec_for(str(student / "diffusion_pytorch_model.safetensors")))
    by_folder = registry.LoadedModel(registry.spec_for(str(student)))
    assert by_file.guided and by_file.guidance_range == (2.0, 8.0) and by_file.guidance_default == 5.0
    assert by_file.unet.config.time_cond_proj_dim == 16
    for w in (2.0, 8.0):
        assert (by_file.generate(PROMPTS, seed=1, guidance=w).images ==
                by_folder.generate(PROMPTS, seed=1, guidance=w).images).all()
