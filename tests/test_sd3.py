"""The SD3-class family (issue 20) on a tiny random StableDiffusion3Pipeline (tests/tiny_sd3.py, shift 3), saved
with save_pretrained and loaded through our loaders, offline:
(a) our condition and teacher sampler against the diffusers pipeline's own, same latents, with and without CFG;
(b) two DMD2 iterations through the real trainer: 1-step with the GAN head over the transformer's tokens, 4-step
with backward simulation, LoRA; (c) exports that plain diffusers loads and samples; (d) the registry; (e) the app
serving `--family sd3`; the flow_shift override; bad inputs fail clearly; the presets."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

import tiny_sd
import tiny_sd3
from conftest import make_caption_folder, served
from dmd2 import registry
from dmd2.families.base import ModelLoadError
from dmd2.families.sd3 import SD3_LORA_TARGETS, SD3Family
from dmd2.images import to_uint8
from dmd2.sampling import ddim_sample, initial_noise, renoise_seed, student_sample
from dmd2.schedule import FlowSchedule
from training.config import ConfigError, DistillConfig, load_config
from training.distill import distill
from training.export import export_checkpoint
from training.simulate import backward_simulate
from training.trainer import DMD2Trainer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD3 pipeline (shift 3), a captioned image folder, a prompt file, one latent cache folder."""
    root = tmp_path_factory.mktemp("sd3-world")
    (root / "prompts.txt").write_text("a photo of a dog\na blue cat\na red photo\n")
    return {"sd3": tiny_sd3.make_tiny_sd3(root / "tiny-sd3"), "data": make_caption_folder(root / "data"),
            "prompts": root / "prompts.txt", "cache": root / "cache", "root": root}


@pytest.fixture(scope="module")
def fam(world) -> SD3Family:
    return SD3Family.from_pretrained(world["sd3"])


@pytest.fixture(scope="module")
def pipe(world) -> StableDiffusion3Pipeline:
    p = StableDiffusion3Pipeline.from_pretrained(world["sd3"])
    p.set_progress_bar_config(disable=True)
    return p


def sd3_config(world, **overrides) -> DistillConfig:
    return tiny_sd.text_config(world, overrides.pop("family", "sd3"), 4.0, **overrides)


snapshot, moved = tiny_sd.snapshot, tiny_sd.moved


def same_outputs(a, b, fam, atol=1e-5):
    """Two transformers give the same velocity on the same noisy latents and prompts."""
    x, t = initial_noise(fam, 2, seed=3), torch.tensor([999, 399])
    cond = fam.condition(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(fam.model_output(a, x, t, cond), fam.model_output(b, x, t, cond), atol=atol, rtol=1e-4)


def plain_student_sample(pipe, transformer, fam, noise, timesteps, seed):
    """A student sampled by plain diffusers as its model card says: FlowMatchEulerDiscreteScheduler with
    stochastic_sampling at the student's sigmas, no CFG. The scheduler draws its fresh noise from torch's global
    generator, which `seed` starts as `student_sample(..., seed=seed)` starts its own."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=fam.schedule.shift,
                                                            stochastic_sampling=True)
    student_pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": transformer, "scheduler": scheduler})
    student_pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(seed)
    with torch.no_grad():
        return student_pipe(prompt=PROMPTS, latents=noise.clone(), sigmas=fam.student_sigmas(timesteps),
                            guidance_scale=1.0, height=fam.height, width=fam.width, output_type="latent").images


# --- (a) the teacher against the diffusers pipeline ------------------------------------------------------------------
def test_condition_is_the_pipelines_encode_prompt(fam, pipe):
    with torch.no_grad():
        pe, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    cond, null = fam.condition(PROMPTS), fam.null_condition(2)
    assert cond["prompt_embeds"].shape == (2, tiny_sd.MAX_TOKENS + 256, tiny_sd3.T5_WIDTH)  # CLIP 16 + T5 256 tokens
    assert cond["pooled_projections"].shape == (2, 2 * tiny_sd.PROJECTION_DIM)
    for ours, theirs in ((cond["prompt_embeds"], pe), (cond["pooled_projections"], pooled),
                         (null["prompt_embeds"], neg), (null["pooled_projections"], neg_pooled)):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # The CLIP part is zero-padded from 8 + 8 to the T5 width 24.
    assert cond["prompt_embeds"][:, :tiny_sd.MAX_TOKENS, 2 * tiny_sd.TEXT_HIDDEN:].abs().max() == 0


def test_schedule_is_the_folders_shifted_flow(fam, pipe):
    assert (fam.schedule.kind, fam.schedule.shift, fam.prediction_type) == ("flow", 3.0, "flow")
    steps = 4
    pipe.scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)])
    ours = fam.schedule.model_timestep(torch.tensor(fam.schedule.sampling_timesteps(steps)))
    torch.testing.assert_close(ours, pipe.scheduler.timesteps, atol=1e-3, rtol=0)  # shifted sigma * 1000


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_teacher_sampler_equals_the_diffusers_pipeline(fam, pipe, guidance):
    """ddim_sample (Euler in (alpha, sigma) form) vs StableDiffusion3Pipeline for the same latents, 3 steps, shift 3."""
    steps, noise = 3, initial_noise(fam, 2, seed=7)
    teacher = fam.load_teacher()
    ours = ddim_sample(fam, teacher, fam.condition(PROMPTS), noise, steps, guidance=guidance)
    with torch.no_grad():
        theirs = pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=steps, guidance_scale=guidance,
                      sigmas=[1 - i / steps for i in range(steps)], height=fam.height, width=fam.width,
                      output_type="latent").images
    diff = (ours - theirs).abs().max().item()
    print(f"\nSD3 sampler cross-check, guidance {guidance}: max |ours - diffusers| = {diff:.2e} "
          f"(latents up to {theirs.abs().max().item():.2f})")
    assert diff < 1e-4


def test_bottleneck_is_the_middle_blocks_tokens_as_a_grid(fam):
    """The first L/2 blocks' image tokens, reshaped row-major to (N, D, h/p, w/p): checked against a forward hook."""
    teacher = fam.load_teacher()
    x, t, cond = initial_noise(fam, 2, seed=1), torch.tensor([600, 200]), fam.condition(PROMPTS)
    seen = {}
    middle = teacher.transformer_blocks[tiny_sd3.NUM_LAYERS // 2 - 1]
    hook = middle.register_forward_hook(lambda m, args, out: seen.update(tokens=out[1]))
    ran = []
    last = teacher.transformer_blocks[-1].register_forward_pre_hook(lambda m, args: ran.append(1))
    try:
        features = fam.bottleneck(teacher, x, t, cond)
    finally:
        hook.remove()
        last.remove()
    assert not ran  # the second half never runs
    assert features.shape == (2, fam.bottleneck_channels(), 4, 4) and fam.bottleneck_size() == 4
    tokens = seen["tokens"]  # (N, 16, D)
    torch.testing.assert_close(features[:, :, 1, 2], tokens[:, 1 * 4 + 2])
    # With gradient checkpointing (the trainer's option), the same features, and gradients reach the input.
    teacher.enable_gradient_checkpointing()
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        checkpointed = fam.bottleneck(teacher, x, t, cond)
        checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed.detach(), features)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vae_latents_use_sd3s_shift_and_scaling(fam, pipe):
    """decode(x) = VAE(x / scaling + shift), as the pipeline decodes; encode inverts it on the posterior sample."""
    assert (fam.vae.config.shift_factor, fam.vae.config.scaling_factor) == (tiny_sd3.SHIFT_FACTOR, tiny_sd3.SCALING_FACTOR)
    x = initial_noise(fam, 1, seed=2)
    with torch.no_grad():
        theirs = pipe.vae.decode(x / tiny_sd3.SCALING_FACTOR + tiny_sd3.SHIFT_FACTOR).sample.clamp(-1, 1)
        torch.testing.assert_close(fam.decode(x), theirs)
        images = theirs
        z = pipe.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    ours = fam.encode(images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, (z - tiny_sd3.SHIFT_FACTOR) * tiny_sd3.SCALING_FACTOR)


# --- (b, c) DMD2 through the real trainer; exports in plain diffusers -------------------------------------------------
def test_1step_with_gan_over_tokens_trains_and_exports_a_diffusers_transformer(world, pipe, tmp_path):
    cfg = sd3_config(world, checkpoint_every=1)
    tr = DMD2Trainer(cfg)
    assert tr.timesteps == [999] and tr.family.schedule.shift == 3.0
    real, real_cond = tr.real_batch()
    assert real.shape == (2, tiny_sd3.LATENT_CHANNELS, 8, 8)
    cond = tr.generator_condition(real_cond)
    gen, critic = tr.generator_module, tr.critic_module
    before_g, before_c = snapshot(gen), snapshot(critic)
    stats = tr.critic_step(real, cond, real_cond)
    assert not moved(before_g, gen)
    changed = moved(before_c, critic)
    assert any(k.startswith("gan_head.") for k in changed) and any(k.startswith("fake_unet.") for k in changed)
    assert all(np.isfinite(v) for v in stats.values())
    before_c = snapshot(critic)
    stats = tr.generator_step(real, cond)
    assert {"generator/dm", "generator/gan_generator"} <= set(stats) and all(np.isfinite(v) for v in stats.values())
    assert moved(before_g, gen) and not moved(before_c, critic)

    run = distill(cfg, tmp_path / "run")
    tr = run.trainer
    assert tr.generator_updates == 2 and moved(snapshot(tr.real_unet), tr.generator_module)
    assert (run.samples / "latest.png").is_file()  # the trainer's sample grid decodes through the SD3 VAE
    last = run.metrics()[-1]
    assert {"generator/dm", "generator/gan_generator", "critic/fake_denoise", "critic/gan_critic"} <= set(last)
    assert all(np.isfinite(v) for v in last.values())
    meta = json.loads((run.student / "dmd2.json").read_text())
    assert meta["family"] == "sd3" and meta["schedule"] == "flow" and meta["flow_shift"] == 3.0
    assert meta["timesteps"] == [999]

    plain = SD3Transformer2DModel.from_pretrained(run.student)  # plain diffusers
    for (k, v), w in zip(tr.student().state_dict().items(), plain.state_dict().values()):
        assert torch.equal(v, w), k
    fam = tr.family
    same_outputs(tr.student(), fam.load_student(run.student), fam)
    # The student in the plain pipeline, as its model card says: one step from sigma 1 is x - u = x0.
    card = (run.student / "MODEL_CARD.md").read_text()
    assert "SD3Transformer2DModel.from_pretrained('student')" in card and "sigmas=[1.0]" in card
    assert "UNet2DConditionModel" not in card and "LCMScheduler" not in card
    noise = initial_noise(fam, 2, seed=4)
    ours = student_sample(fam, fam.load_student(run.student), fam.condition(PROMPTS), noise, [999])
    torch.testing.assert_close(ours, plain_student_sample(pipe, plain, fam, noise, [999], seed=0), atol=1e-4, rtol=1e-4)

    out = export_checkpoint(run.path, tmp_path / "exported", step=1)  # a checkpoint as a student folder
    assert json.loads((out / "dmd2.json").read_text())["flow_shift"] == 3.0
    assert SD3Transformer2DModel.from_pretrained(out).config.num_layers == tiny_sd3.NUM_LAYERS


def test_4step_backward_simulation_runs_the_generators_own_steps(world):
    tr = DMD2Trainer(sd3_config(world, student_steps=4, backward_simulation=True, ttur=2, iterations=4))
    assert tr.timesteps == [999, 749, 499, 249]
    fam, gen = tr.family, tr.generator_module
    cond = fam.condition(["a red dog", "a photo of a cat"])
    noise = initial_noise(fam, 2, seed=5)
    got = backward_simulate(fam, gen, cond, tr.timesteps, 3, noise, torch.Generator().manual_seed(1))
    rng, x = torch.Generator().manual_seed(1), noise
    with torch.no_grad():
        for i in range(3):  # by hand: x0 = x - sigma u, re-noised to the next student timestep with fresh noise
            s = fam.schedule.sigma(tr.timesteps[i])
            x0 = x - s * fam.model_output(gen, x, torch.tensor([tr.timesteps[i]] * 2), cond)
            s_next = fam.schedule.sigma(tr.timesteps[i + 1])
            x = (1 - s_next) * x0 + s_next * torch.randn(x0.shape, generator=rng)
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)
    kinds = []
    for _ in range(4):
        stats = tr.train_step()
        kinds.append("G" if "generator/dm" in stats else "C")
        assert all(np.isfinite(v) for v in stats.values())
    assert kinds == ["C", "G", "C", "G"] and tr.generator_updates == 2


def test_lora_trains_only_the_attention_adapters_and_loads_in_plain_diffusers(world, pipe, tmp_path):
    cfg = sd3_config(world, lora_rank=4, lora_alpha=2.0, student_steps=4, ema_decay=0.5)
    run = distill(cfg, tmp_path / "run")
    tr = run.trainer
    gen = tr.generator_module
    lora = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    layers = {n.split(".lora_")[0].split(".", 2)[-1] for n in lora}  # e.g. "attn.to_q"
    assert layers == set(SD3_LORA_TARGETS)
    teacher = tr.real_unet.state_dict()
    base = {n.replace(".base_layer", ""): p for n, p in gen.state_dict().items() if ".lora_" not in n}
    assert base.keys() == teacher.keys() and all(torch.equal(p, teacher[n]) for n, p in base.items())  # base unmoved
    student = tr.student()
    assert sorted(p.name for p in run.student.iterdir()) == ["MODEL_CARD.md", "dmd2.json",
                                                            "pytorch_lora_weights.safetensors"]
    fam = tr.family
    with torch.no_grad():
        x, t, cond = initial_noise(fam, 1, 0), torch.tensor([999]), fam.condition(["a cat"])
        assert (fam.model_output(student, x, t, cond) - fam.model_output(fam.load_teacher(), x, t, cond)).abs().max() > 1e-6
    plain = StableDiffusion3Pipeline.from_pretrained(world["sd3"])  # plain diffusers, with peft
    plain.load_lora_weights(run.student)
    same_outputs(student, plain.transformer, fam)
    same_outputs(student, fam.load_student(run.student), fam)  # our loader fuses it with the same alpha / rank
    # The model card's recipe samples the 4-step student in plain diffusers: the same images for the same noises.
    card = (run.student / "MODEL_CARD.md").read_text()
    assert "load_lora_weights('student')" in card and "sigmas=[1.0, 0.75, 0.5, 0.25]" in card
    noise = initial_noise(fam, 2, seed=6)
    ours = student_sample(fam, student, fam.condition(PROMPTS), noise, tr.timesteps, seed=11)
    theirs = plain_student_sample(plain, plain.transformer, fam, noise, tr.timesteps, seed=11)
    print(f"\nSD3 4-step LoRA student, ours vs plain diffusers: max diff {(ours - theirs).abs().max().item():.2e}")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    other = plain_student_sample(plain, plain.transformer, fam, noise, tr.timesteps, seed=12)
    assert (other - theirs).abs().max() > 1e-3  # the fresh noises matter: the match above is not vacuous


# --- (d) registry, (e) app -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def students(world, fam):
    """A 2-step student folder of random weights (a full transformer) beside the tiny pipeline."""
    folder = world["root"] / "student-2step"
    fam.save_student(fam.unet_from_state_dict(tiny_sd3.tiny_transformer(seed=1).state_dict()), folder,
                     timesteps=[999, 499], schedule="flow", flow_shift=3.0)
    return {"2step": str(folder)}


def test_registry_serves_the_pipeline_and_a_student(world, students, monkeypatch):
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})
    spec = registry.spec_for(str(world["sd3"]))
    assert (spec.kind, spec.family, spec.conditioning) == ("teacher", "sd3", "text")
    student = registry.spec_for(students["2step"])
    assert (student.kind, student.family, student.timesteps, student.base) == ("student", "sd3", (999, 499),
                                                                               str(world["sd3"]))
    teacher = registry.load(str(world["sd3"]))
    out = teacher.generate(PROMPTS, seed=3, steps=2, guidance=3.0)
    assert out.images.shape == (2, 16, 16, 3) and out.nfe == 4
    model = registry.load(students["2step"])
    assert model.family is teacher.family  # one set of text encoders and VAE
    out = model.generate(PROMPTS, seed=3)
    assert out.images.shape == (2, 16, 16, 3) and out.nfe == 2 and out.images.std() > 0


def test_a_student_trained_with_its_own_flow_shift_samples_on_it(world, fam, students, monkeypatch, tmp_path):
    """dmd2.json's flow_shift (a config's override) gives the student its own schedule; the teacher keeps 3.0."""
    import shutil

    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})
    folder = tmp_path / "student-shift-1.5"
    shutil.copytree(students["2step"], folder)
    meta = json.loads((folder / "dmd2.json").read_text())
    (folder / "dmd2.json").write_text(json.dumps({**meta, "flow_shift": 1.5}))
    model, teacher = registry.load(str(folder)), registry.load(str(world["sd3"]))
    assert model.family.schedule.shift == 1.5 and teacher.family.schedule.shift == 3.0
    assert model.family.text_encoder_3 is teacher.family.text_encoder_3  # the encoders are still shared
    out = model.generate(PROMPTS, seed=3)
    fam15 = SD3Family.from_pretrained(world["sd3"])
    fam15.schedule = FlowSchedule(1.5)
    x = student_sample(fam15, model.unet, fam15.condition(PROMPTS), initial_noise(fam15, 2, 3), [999, 499],
                       seed=renoise_seed(3))
    assert np.array_equal(out.images, to_uint8(fam15.decode(x)))
    (folder / "dmd2.json").write_text(json.dumps({**meta, "flow_shift": -1}))
    registry.forget(str(folder))
    with pytest.raises(ModelLoadError, match="shift must be a positive number"):
        registry.load(str(folder))


def test_the_sd3_medium_name_loads_from_the_hub_cache_offline(world, tmp_path, monkeypatch):
    """`sd3-medium-teacher` is available only once its repo is in the Hugging Face cache (here: the tiny pipeline
    laid out as stabilityai/stable-diffusion-3-medium-diffusers), then loads with no network."""
    import huggingface_hub.constants

    from test_registry_text import _cache_repo

    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert registry.available("sd3") == []
    with pytest.raises(ModelLoadError, match="hf download stabilityai/stable-diffusion-3-medium-diffusers") as e:
        registry.load("sd3-medium-teacher")
    assert "sd3 wants a GPU" in str(e.value) and "SDXL" not in str(e.value)
    _cache_repo(tmp_path / "hub", "stabilityai/stable-diffusion-3-medium-diffusers", {".": world["sd3"]})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    registry.forget("sd3-medium-teacher")
    assert registry.available("sd3") == ["sd3-medium-teacher"]
    teacher = registry.load("sd3-medium-teacher")
    assert teacher.default_steps() == 28 and teacher.family.default_guidance == 7.0
    out = teacher.generate(PROMPTS, seed=0, steps=2)
    assert out.images.shape == (2, 16, 16, 3) and out.nfe == 4


def test_bad_inputs_fail_clearly(world, fam, tmp_path):
    sdxl = tiny_sd.make_tiny_sdxl(tmp_path / "sdxl")
    with pytest.raises(ModelLoadError, match="is a StableDiffusionXLPipeline pipeline, not a StableDiffusion3Pipeline"):
        SD3Family.from_pretrained(sdxl)
    with pytest.raises(ModelLoadError, match="no readable model_index.json"):
        SD3Family.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="SD3 student not found"):
        fam.load_student(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="holds a UNet2DConditionModel, not an SD3Transformer2DModel"):
        fam.load_student(sdxl / "unet")
    save_file({"pos_embed.proj.weight": torch.zeros(1)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit the SD3 transformer"):
        fam.load_student(tmp_path / "partial.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.no_such_block.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
               "transformer.no_such_block.to_q.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(tmp_path / "foreign-lora.safetensors"))
    with pytest.raises(ModelLoadError, match="'no_such_block.to_q' matches no Linear"):
        fam.load_student(tmp_path / "foreign-lora.safetensors")
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 5, generator=g),
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(tmp_path / "misfit-lora.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit this transformer"):
        fam.load_student(tmp_path / "misfit-lora.safetensors")
    with pytest.raises(ValueError, match="not guidance-conditioned"):
        fam.model_output(fam.load_teacher(), initial_noise(fam, 1, 0), torch.tensor([500]), fam.condition(["a"]),
                         guidance_input=2.0)


def test_a_full_transformer_state_dict_file_loads(fam, tmp_path):
    weights = tiny_sd3.tiny_transformer(seed=3)
    save_file(weights.state_dict(), str(tmp_path / "student.safetensors"))
    same_outputs(fam.load_student(tmp_path / "student.safetensors"), weights, fam)


def test_bf16_frozen_parts_with_lora_and_gradient_checkpointing(world, tmp_path):
    cfg = sd3_config(world, lora_rank=4, mixed_precision="bf16", frozen_dtype="bf16", gradient_checkpointing=True,
                     sample_every=0)
    run = distill(cfg, tmp_path / "run")
    tr = run.trainer
    assert tr.real_unet.dtype == tr.family.text_encoder_3.dtype == torch.bfloat16
    assert tr.generator_module.is_gradient_checkpointing and tr.critic_module.fake_unet.is_gradient_checkpointing
    assert {p.dtype for p in tr.critic_module.parameters()} == {torch.float32}  # the fake score trains in fp32
    assert all(np.isfinite(v) for v in run.metrics()[-1].values())
    assert (run.student / "pytorch_lora_weights.safetensors").is_file()


def test_a_peft_layout_lora_file_fuses_like_the_pipeline(world, fam, tmp_path):
    """A bare PEFT-layout LoRA (no prefix, no alpha: factor 1) fused by our loader = diffusers' load_lora_weights."""
    g = torch.Generator().manual_seed(2)
    layers = {"transformer_blocks.1.attn.to_q": (8, 8), "transformer_blocks.0.attn.add_v_proj": (8, 8)}
    sd = {}
    for name, (out_f, in_f) in layers.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(2, in_f, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(out_f, 2, generator=g)
    save_file(sd, str(tmp_path / "peft.safetensors"))
    ours = fam.load_student(tmp_path / "peft.safetensors")
    plain = StableDiffusion3Pipeline.from_pretrained(world["sd3"])
    plain.load_lora_weights({f"transformer.{k}": v for k, v in sd.items()})
    same_outputs(ours, plain.transformer, fam)


@pytest.fixture(scope="module")
def client(world, students, tmp_path_factory):
    from gradio_client import Client

    from dmd2.ui.app import build_app

    demo = build_app([str(world["sd3"]), students["2step"]], votes_path=tmp_path_factory.mktemp("votes") / "v.sqlite",
                     family="sd3")
    with served(demo) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def test_the_app_serves_the_sd3_family_in_compare(client):
    from PIL import Image

    out = client.predict("a photo of a red cat", 5, 4, 2, 3.0, api_name="/compare")
    t_img, t_cap, s_img, s_cap = out
    assert t_cap.startswith("tiny-sd3: NFE 4, steps 2, ") and s_cap.startswith("student-2step: NFE 2, steps 2, ")
    grid = (2 * 16 + 2, 2 * 16 + 2, 3)
    assert np.asarray(Image.open(t_img)).shape == np.asarray(Image.open(s_img)).shape == grid


# --- the config: flow_shift, what sd3 does not have, the presets -----------------------------------------------------
def test_flow_shift_overrides_the_teachers_and_is_refused_for_ddpm(world, tmp_path):
    tr = DMD2Trainer(sd3_config(world, flow_shift=1.5, student_steps=4))
    assert tr.family.schedule.shift == 1.5 and tr.student_meta()["flow_shift"] == 1.5
    u = (749 + 1) / 1000
    assert float(tr.family.schedule.sigma(749)) == pytest.approx(1.5 * u / (1 + 0.5 * u))
    sdxl = tiny_sd.make_tiny_sdxl(tmp_path / "sdxl")
    with pytest.raises(ConfigError, match="is not a flow model"):
        DMD2Trainer(sd3_config(world, family="sdxl", teacher=str(sdxl), flow_shift=3.0))


def test_guidance_conditioning_and_the_per_step_critic_are_refused_for_sd3(world):
    with pytest.raises(ConfigError, match="guidance_range.*sd3"):
        sd3_config(world, guidance_range=[2.0, 6.0])
    with pytest.raises(ConfigError, match="critic_per_step.*sd3"):
        sd3_config(world, student_steps=4, critic_per_step=True)


@pytest.mark.parametrize("name", ["sd3-4step", "sd3-1step"])
def test_sd3_presets_parse_and_cite_their_sources(name):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    header = path.read_text().split("\nfamily:")[0]
    assert cfg.family == "sd3" and cfg.teacher == "stabilityai/stable-diffusion-3-medium-diffusers"
    assert cfg.resolution == 1024 and cfg.flow_shift is None  # the teacher's shift 3.0
    assert cfg.gan_head == "official" and (cfg.warmup_unit, cfg.warmup_steps) == ("iterations", 8)
    assert (cfg.ttur, cfg.gan_generator_weight, cfg.gan_critic_weight) == (5, 5e-3, 1e-2)
    assert cfg.student_steps == (4 if "4step" in name else 1)
    for source in ("Esser et al. 2024", "DMD2", "training distill", "diffusers"):
        assert source in header
