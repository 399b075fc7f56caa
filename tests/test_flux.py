"""The FLUX family on tiny random FluxPipelines (saved with save_pretrained, loaded through our loader): the teacher
sampler against FluxPipeline's own sampling, the transformer bottleneck, two DMD2 iterations (1-step; 4-step with
backward simulation; LoRA; GAN) with the guidance as a network input and no CFG pass, exports that plain diffusers
loads, the registry and the app with --family flux."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

import tiny_flux
import tiny_sd
from conftest import make_caption_folder, served
from dmd2 import registry
from dmd2.families.base import ModelLoadError
from dmd2.families.flux import FluxFamily, pack, unpack
from dmd2.sampling import ddim_sample, initial_noise, student_sample
from dmd2.schedule import FlowSchedule
from training.config import DistillConfig, load_config
from training.distill import distill
from training.simulate import backward_simulate
from training.trainer import DMD2Trainer

ROOT = Path(__file__).resolve().parent.parent
SEQ = tiny_flux.MAX_SEQUENCE_LENGTH
PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny FLUX.1-dev-like pipeline, a schnell-like one (no guidance embeddings), an SDXL one (the wrong
    family), captioned images, a prompt file and a latent cache folder."""
    root = tmp_path_factory.mktemp("flux-world")
    (root / "prompts.txt").write_text("a photo of a dog\na blue cat\na red photo\n")
    return {"flux": tiny_flux.make_tiny_flux(root / "flux"),
            "schnell": tiny_flux.make_tiny_flux(root / "schnell", seed=1, guidance_embeds=False),
            "sdxl": tiny_sd.make_tiny_sdxl(root / "sdxl"), "data": make_caption_folder(root / "data"),
            "prompts": root / "prompts.txt", "cache": root / "cache", "root": root}


@pytest.fixture(scope="module")
def family(world):
    return FluxFamily.from_pretrained(world["flux"], max_sequence_length=SEQ)


def flux_config(world, **overrides) -> DistillConfig:
    return tiny_sd.text_config(world, overrides.pop("family", "flux"), 4.0, **overrides)


snapshot, moved = tiny_sd.snapshot, tiny_sd.moved


def record_calls(module) -> list[tuple[int, tuple | None]]:
    """(batch size, guidance input) of every forward of a FluxTransformer2DModel, from now on."""
    calls = []

    def hook(mod, args, kwargs):
        g = kwargs.get("guidance")
        calls.append((kwargs["hidden_states"].shape[0], None if g is None else tuple(sorted(set(g.tolist())))))

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def same_outputs(a, b, fam, atol=1e-5):
    x, t = initial_noise(fam, 2, seed=3), torch.tensor([999, 399])
    cond = fam.condition(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(fam.model_output(a, x, t, cond), fam.model_output(b, x, t, cond), atol=atol,
                                   rtol=1e-4)


# --- the family against diffusers ---------------------------------------------------------------------------
@pytest.mark.parametrize("which, height, width, g", [("flux", 16, 16, 4.0), ("flux", 32, 16, 2.5),
                                                     ("schnell", 16, 16, 1.0)])
def test_teacher_sampler_equals_flux_pipeline(world, which, height, width, g):
    """ddim_sample (Euler in (alpha, sigma) form) == FluxPipeline for the same packed latents: the dynamic shift
    exp(mu) at this resolution, FluxPipeline's sigmas, the guidance as the transformer's input (one forward per step)."""
    fam = FluxFamily.from_pretrained(world[which], height=height, width=width, max_sequence_length=SEQ)
    pipe = FluxPipeline.from_pretrained(world[which])
    noise = initial_noise(fam, 2, seed=7)
    steps = 4
    calls = record_calls(pipe.transformer)
    ours = ddim_sample(fam, pipe.transformer, fam.condition(PROMPTS), noise, steps, guidance=g)
    assert calls == [(2, (g,) if which == "flux" else None)] * steps          # no CFG pass: one batch of 2 per step
    theirs = pipe(prompt=PROMPTS, latents=pack(noise), num_inference_steps=steps, guidance_scale=g, height=height,
                  width=width, output_type="latent", max_sequence_length=SEQ).images
    theirs = unpack(theirs, *fam.latent_shape(1)[-2:])
    diff = (ours - theirs).abs().max().item()
    print(f"\n{which} {height}x{width} g={g}: max |ours - FluxPipeline| = {diff:.3g} (|x| max {theirs.abs().max():.3g})")
    assert diff < 1e-5
    # The schedule: FluxPipeline's sigmas (after its time_shift(mu)) are ours at the sampling timesteps.
    ts = fam.schedule.sampling_timesteps(steps)
    torch.testing.assert_close(fam.schedule.sigma(torch.tensor(ts)), pipe.scheduler.sigmas[:-1].float(), atol=1e-6,
                               rtol=1e-6)
    if which == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        assert fam.schedule.shift == pytest.approx(math.exp(calculate_shift((height // 4) * (width // 4))))
    else:
        assert fam.schedule.shift == 1.0


def test_condition_is_flux_pipelines_encode_prompt(world, family):
    pipe = FluxPipeline.from_pretrained(world["flux"])
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
    cond = family.condition(PROMPTS)
    # The same computation; only the kernels may differ (diffusers runs it with autograd on).
    torch.testing.assert_close(cond["prompt_embeds"], embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, atol=1e-6, rtol=1e-6)
    assert torch.equal(text_ids, torch.zeros(SEQ, 3))
    assert torch.equal(family.null_condition(3)["prompt_embeds"][2], family.condition([""])["prompt_embeds"][0])
    x = initial_noise(family, 2, seed=1)
    assert torch.equal(unpack(pack(x), 8, 8), x)
    assert torch.equal(pack(x), FluxPipeline._pack_latents(x, 2, 4, 8, 8))


def test_velocity_sign_and_denoise_without_cfg(world, family):
    """FLUX's output is u = eps - x0: on a network that outputs exactly that, denoise returns x0."""
    teacher = family.load_teacher()
    x0, eps, t = torch.randn(family.latent_shape(2)), torch.randn(family.latent_shape(2)), torch.tensor([700, 300])
    x_t = family.schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(family.schedule.to_x0(x_t, eps - x0, t, "flow"), x0, atol=1e-5, rtol=1e-5)
    calls = record_calls(teacher)
    cond = family.condition(PROMPTS)
    family.denoise(teacher, x_t, t, cond)                                  # guidance 1: the student's input
    family.denoise(teacher, x_t, t, cond, guidance=torch.tensor([2.0, 5.0]))  # one scale per sample
    family.denoise(teacher, x_t, t, cond, guidance_input=1.0)              # the teacher at an input of exactly 1
    assert calls == [(2, (family.student_guidance,)), (2, (2.0, 5.0)), (2, (1.0,))]
    with pytest.raises(ValueError, match="not both"):
        family.denoise(teacher, x_t, t, cond, guidance=2.0, guidance_input=3.0)


def test_bottleneck_is_the_forward_up_to_the_middle_block(family):
    teacher = family.load_teacher()
    depth = family.bottleneck_depth()
    assert depth == 2  # 1 double-stream + 3 single-stream blocks: after the first single-stream block
    seen = {}
    teacher.single_transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.update(tokens=out[1]))
    x, t, cond = initial_noise(family, 2, seed=2), torch.tensor([999, 250]), family.condition(PROMPTS)
    with torch.no_grad():
        family.model_output(teacher, x, t, cond)
        feats = family.bottleneck(teacher, x, t, cond)
    assert feats.shape == (2, family.bottleneck_channels(), 4, 4) and family.bottleneck_size() == 4
    torch.testing.assert_close(feats, seen["tokens"].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))


# --- DMD2 training -----------------------------------------------------------------------------------------
def test_1step_trains_with_guidance_inputs_no_cfg_pass_and_exports(world, tmp_path):
    cfg = flux_config(world, student_steps=1, gan_head="official")
    tr = DMD2Trainer(cfg)
    assert tr.family.name == "flux" and isinstance(tr.family.schedule, FlowSchedule) and tr.timesteps == [999]
    real, gen, fake = record_calls(tr.real_unet), record_calls(tr.generator_module), record_calls(tr.critic_module.fake_unet)
    before_g, before_head = snapshot(tr.generator_module), snapshot(tr.critic_module.gan_head)
    for _ in range(2):
        stats = tr.train_step()
        assert all(math.isfinite(v) for v in stats.values())
    assert {"generator/dm", "generator/gan_generator", "critic/fake_denoise", "critic/gan_critic"} <= set(stats)
    # The real score: the teacher at real_guidance as its guidance input, one batch of 2 (no CFG pass, no doubling).
    assert real == [(2, (4.0,))] * 2
    # The generator and the fake score: the fixed student guidance input, never a doubled batch.
    assert set(gen) == {(2, (3.5,))} and set(fake) == {(2, (3.5,))}
    assert moved(before_g, tr.generator_module) and moved(before_head, tr.critic_module.gan_head)  # GAN head trained

    run = distill(cfg, tmp_path / "run")
    meta = json.loads((run.student / "dmd2.json").read_text())
    assert (meta["family"], meta["schedule"], meta["timesteps"], meta["student_guidance"]) == ("flux", "flow", [999], 3.5)
    assert meta["flow_shift"] == pytest.approx(run.trainer.family.schedule.shift)
    plain = FluxTransformer2DModel.from_pretrained(run.student)             # plain diffusers
    for (k, v), w in zip(run.trainer.student().state_dict().items(), plain.state_dict().values()):
        assert torch.equal(v, w), k
    fam = run.trainer.family
    same_outputs(run.trainer.student(), fam.load_student(run.student), fam)
    assert (run.samples / "latest.png").is_file()
    # The model card's plain-diffusers recipe samples what our student sampler samples.
    card = (run.student / "MODEL_CARD.md").read_text()
    assert "FluxTransformer2DModel.from_pretrained('student')" in card and "stochastic_sampling=True" in card
    pipe = FluxPipeline.from_pretrained(world["flux"], transformer=plain)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift=fam.schedule.shift, stochastic_sampling=True)
    noise = initial_noise(fam, 2, seed=11)
    theirs = pipe(PROMPTS, latents=pack(noise), sigmas=fam.student_sigmas([999]), guidance_scale=3.5,
                  height=16, width=16, output_type="latent").images
    ours = student_sample(fam, plain, fam.condition(PROMPTS), noise, [999])
    torch.testing.assert_close(ours, unpack(theirs, 8, 8), atol=1e-5, rtol=1e-5)


def test_4step_backward_simulation_runs_the_generators_own_steps(world):
    """Also: bf16 frozen teacher and autocast, gradient checkpointing (the bottleneck's checkpointed blocks too)."""
    cfg = flux_config(world, student_steps=4, backward_simulation=True, ttur=2, iterations=4, mixed_precision="bf16",
                      frozen_dtype="bf16", gradient_checkpointing=True)
    tr = DMD2Trainer(cfg)
    assert tr.timesteps == [999, 749, 499, 249] and tr.real_unet.dtype == torch.bfloat16
    assert tr.generator_module.is_gradient_checkpointing and tr.critic_module.fake_unet.is_gradient_checkpointing
    fam, gen = tr.family, tr.generator_module
    cond, noise = fam.condition(PROMPTS), initial_noise(fam, 2, seed=5)
    got = backward_simulate(fam, gen, cond, tr.timesteps, 3, noise, torch.Generator().manual_seed(1))
    rng, x = torch.Generator().manual_seed(1), noise
    with torch.no_grad():
        for i in range(3):
            x0 = fam.denoise(gen, x, tr.timesteps[i], cond)
            x = fam.schedule.add_noise(x0, torch.randn(x0.shape, generator=rng), torch.tensor([tr.timesteps[i + 1]]))
    torch.testing.assert_close(got, x)
    before, before_head = snapshot(gen), snapshot(tr.critic_module.gan_head)
    stats = [tr.train_step() for _ in range(4)]
    assert ["G" if "generator/dm" in st else "C" for st in stats] == ["C", "G", "C", "G"] and tr.generator_updates == 2
    assert all(math.isfinite(v) for st in stats for v in st.values()) and "critic/gan_critic" in stats[-1]
    assert moved(before, gen) and moved(before_head, tr.critic_module.gan_head)


def test_a_schnell_like_teacher_ignores_guidance(world, tmp_path):
    fam = FluxFamily.from_pretrained(world["schnell"], max_sequence_length=SEQ)
    teacher = fam.load_teacher()
    calls = record_calls(teacher)
    x, cond = initial_noise(fam, 2, seed=1), fam.condition(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(fam.denoise(teacher, x, 600, cond, guidance=4.0), fam.denoise(teacher, x, 600, cond))
    assert calls == [(2, None)] * 2 and fam.schedule.shift == 1.0
    fam.save_student(teacher, tmp_path / "s", timesteps=[999])
    assert json.loads((tmp_path / "s" / "dmd2.json").read_text())["student_guidance"] is None
    same_outputs(teacher, fam.load_student(tmp_path / "s"), fam, atol=0)


def test_lora_trains_only_the_adapter_and_loads_in_plain_diffusers(world, tmp_path):
    cfg = flux_config(world, lora_rank=4, lora_alpha=2.0, student_steps=4, ema_decay=0.5)
    run = distill(cfg, tmp_path / "run")
    tr = run.trainer
    gen = tr.generator_module
    trained = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert any("transformer_blocks.0.attn.add_q_proj.lora_A" in n for n in trained)
    assert any("single_transformer_blocks.0.attn.to_q.lora_A" in n for n in trained)
    assert not any(n.startswith("proj_out") for n in trained)
    teacher = tr.real_unet.state_dict()
    for k, v in gen.state_dict().items():  # the frozen base is still the teacher; the LoRA moved (B starts at 0)
        if ".lora_" not in k:
            assert torch.equal(v, teacher[k.replace(".base_layer", "")]), k
    assert any(v.abs().max() > 0 for k, v in gen.state_dict().items() if ".lora_B." in k)
    assert sorted(p.name for p in run.student.iterdir()) == ["MODEL_CARD.md", "dmd2.json",
                                                            "pytorch_lora_weights.safetensors"]
    student, fam = tr.student(), tr.family
    pipe = FluxPipeline.from_pretrained(world["flux"])                     # plain diffusers, with peft
    pipe.load_lora_weights(run.student)
    x, t, cond = initial_noise(fam, 1, 0), torch.tensor([999]), fam.condition(["a cat"])
    with torch.no_grad():
        assert (fam.model_output(student, x, t, cond) - fam.model_output(fam.load_teacher(), x, t, cond)).abs().max() > 1e-6
    same_outputs(student, pipe.transformer, fam)
    same_outputs(student, fam.load_student(run.student), fam)              # our loader fuses it with the same alpha
    same_outputs(student, fam.load_student(run.student / "pytorch_lora_weights.safetensors"), fam)


def test_a_peft_layout_lora_with_alpha_fuses_with_its_scale(family, tmp_path):
    """PEFT's bare keys with a per-layer .alpha (FLUX's diffusers loader moves alpha keys aside; they still count)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    a, b = torch.randn(2, 16), torch.randn(16, 2)
    layer = "transformer_blocks.0.attn.to_q"
    save_file({f"{layer}.lora_A.weight": a, f"{layer}.lora_B.weight": b, f"{layer}.alpha": torch.tensor(1.0)},
              tmp_path / "peft.safetensors")
    before = family.load_teacher().state_dict()
    fused = family.load_student(tmp_path / "peft.safetensors").state_dict()
    torch.testing.assert_close(fused[f"{layer}.weight"], before[f"{layer}.weight"] + 0.5 * b @ a)  # alpha / rank
    assert all(torch.equal(fused[k], v) for k, v in before.items() if not k.startswith(layer))


# --- loading, registry, bad inputs ---------------------------------------------------------------------------
def test_registry_serves_a_flux_pipeline_folder_and_a_trained_student(world, tmp_path):
    fam = FluxFamily.from_pretrained(world["flux"])
    torch.manual_seed(3)
    student = fam.transformer_from_state_dict(tiny_flux.tiny_transformer().state_dict())
    fam.save_student(student, tmp_path / "student", timesteps=[999, 499], schedule="flow", flow_shift=fam.schedule.shift)
    full = tmp_path / "full.safetensors"
    from safetensors.torch import save_file

    save_file(student.state_dict(), full)
    same_outputs(student, fam.load_student(full), fam, atol=0)            # a full state-dict file

    teacher_spec = registry.spec_for(str(world["flux"]))
    assert (teacher_spec.kind, teacher_spec.family) == ("teacher", "flux")
    spec = registry.spec_for(str(tmp_path / "student"))
    assert (spec.kind, spec.family, spec.timesteps) == ("student", "flux", (999, 499))
    t_out = registry.load(str(world["flux"])).generate(prompts=PROMPTS, seed=1, steps=3, guidance=2.0)
    assert t_out.nfe == 3 and t_out.images.shape == (2, 16, 16, 3)           # guidance in the network: 1 NFE per step
    s_out = registry.load(str(tmp_path / "student")).generate(prompts=PROMPTS, seed=1)
    assert s_out.nfe == 2 and s_out.images.shape == (2, 16, 16, 3)


def test_bad_inputs_fail_clearly(world, family, tmp_path):
    with pytest.raises(ModelLoadError, match="StableDiffusionXLPipeline folder, not a FluxPipeline"):
        FluxFamily.from_pretrained(world["sdxl"])
    with pytest.raises(ModelLoadError, match="no readable transformer/config.json"):
        FluxFamily.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="resolution 18x18: must be a multiple of 4"):
        FluxFamily.from_pretrained(world["flux"], height=18, width=18)
    with pytest.raises(ModelLoadError, match="not found"):
        family.load_student(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel, not a FluxTransformer2DModel"):
        family.load_student(world["sdxl"] / "unet")
    sdxl_lora = tmp_path / "sdxl-lora.safetensors"
    from safetensors.torch import save_file

    save_file({"transformer.down_blocks.0.conv1.lora_A.weight": torch.zeros(2, 4),
               "transformer.down_blocks.0.conv1.lora_B.weight": torch.zeros(4, 2)}, sdxl_lora)
    with pytest.raises(ModelLoadError, match="matches no Linear"):
        family.load_student(sdxl_lora)
    save_file({"x_embedder.weight": torch.zeros(3, 3)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit the FLUX transformer"):
        family.load_student(tmp_path / "wrong.safetensors")
    other = tmp_path / "other-guidance"
    family.save_student(family.load_teacher(), other, timesteps=[999])
    meta = json.loads((other / "dmd2.json").read_text())
    (other / "dmd2.json").write_text(json.dumps({**meta, "student_guidance": 2.0}))
    with pytest.raises(ModelLoadError, match="trained at guidance input 2.0"):
        family.load_student(other)


def test_flux_presets_parse_and_carry_their_settings():
    for name in ("flux-4step", "flux-4step-lora", "flux-1step"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        header = (ROOT / "configs" / f"{name}.yaml").read_text().split("\nfamily:")[0]
        assert "training distill" in header and "guidance" in header
        assert (cfg.family, cfg.real_guidance, cfg.ttur, cfg.resolution) == ("flux", 3.5, 5, 1024)
        assert (cfg.gan_generator_weight, cfg.gan_critic_weight) == (5e-3, 1e-2)
        if "lora" in name:
            assert (cfg.lora_rank, cfg.lora_alpha, cfg.student_steps) == (64, 8.0, 4)
        assert cfg.student_steps == (1 if "1step" in name else 4)


# --- the app ----------------------------------------------------------------------------------------------------
def test_app_serves_a_flux_teacher_and_student_in_compare(world, tmp_path):
    from gradio_client import Client
    from PIL import Image

    from dmd2.ui.app import build_app

    fam = FluxFamily.from_pretrained(world["flux"])
    torch.manual_seed(4)
    fam.save_student(fam.transformer_from_state_dict(tiny_flux.tiny_transformer().state_dict()),
                     tmp_path / "flux-student", timesteps=[999])
    models = [str(world["flux"]), str(tmp_path / "flux-student")]
    demo = build_app(models, votes_path=tmp_path / "votes.sqlite", family="flux")
    teacher_calls = record_calls(registry.load(models[0]).unet)
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        t_img, t_cap, s_img, s_cap = client.predict("a photo of a red cat", 5, 1, 2, 3.0, api_name="/compare")
    assert t_cap.startswith("flux: NFE 2, steps 2, ") and s_cap.startswith("flux-student: NFE 1, steps 1, ")
    assert np.asarray(Image.open(t_img)).shape == np.asarray(Image.open(s_img)).shape == (16, 16, 3)
    assert teacher_calls == [(1, (3.0,))] * 2                # the slider's guidance went to the network, no CFG pass
