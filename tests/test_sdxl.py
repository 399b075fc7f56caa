"""SDXL and SD1.5 families on tiny random pipelines saved with save_pretrained and loaded through
our loaders: conditioning, CFG, bottleneck, VAEs, published-student loaders (on fake weight
files with the real key layout) and a cross-check of the student sampler against plain
diffusers (StableDiffusion(XL)Pipeline + LCMScheduler with explicit timesteps)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderTiny, LCMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from safetensors.torch import save_file

from dmd2.families.sd import TextCondition
from dmd2.families.base import ModelLoadError
from dmd2.families.sd15 import SD15Family
from dmd2.families.sdxl import PUBLISHED, SDXLFamily
from dmd2.hub import hub_file
from dmd2.sampling import initial_noise, student_sample

import tiny_sd
from lora_files import fake_dmd2_lora

PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return tiny_sd.make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    return tiny_sd.make_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15"))


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return SDXLFamily.from_pretrained(sdxl_dir)


@pytest.fixture(scope="module")
def sd15(sd15_dir):
    return SD15Family.from_pretrained(sd15_dir)


@pytest.fixture(scope="module")
def sdxl_unet(sdxl):
    return sdxl.load_teacher()


@pytest.fixture(scope="module")
def sd15_unet(sd15):
    return sd15.load_teacher()


def _pipeline(cls, folder):
    """Plain diffusers, loaded on its own from the same folder, sampling with LCMScheduler as DMD2's README does."""
    pipe = cls.from_pretrained(folder, **({} if cls is StableDiffusionXLPipeline else {"safety_checker": None}))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_dir):
    return _pipeline(StableDiffusionXLPipeline, sdxl_dir)


@pytest.fixture(scope="module")
def sd15_pipe(sd15_dir):
    return _pipeline(StableDiffusionPipeline, sd15_dir)


def _x0_by_hand(unet, x, t, prompt_embeds, added=None):
    """eps -> x0 with diffusers' own alphas_cumprod, one plain UNet call: the reference for our denoise."""
    ab = LCMScheduler().alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eps = unet(x, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


# --- loading ---------------------------------------------------------------------------------
def test_sdxl_loads_from_a_saved_folder(sdxl, sdxl_dir, sdxl_unet):
    assert sdxl.name == "sdxl" and sdxl.prediction_type == "epsilon"
    assert sdxl.real_guidance == 8.0 and sdxl.default_guidance == 5.0
    assert (sdxl.height, sdxl.width, sdxl.vae_scale_factor) == (16, 16, 2)
    assert sdxl.latent_shape(3) == (3, 4, 8, 8)
    assert sdxl.dtype == torch.float32 and sdxl.device.type == "cpu"
    assert sdxl.bottleneck_channels() == 8
    torch.testing.assert_close(sdxl.schedule.alphas_cumprod, LCMScheduler().alphas_cumprod, atol=1e-6, rtol=1e-5)
    reference = UNet2DConditionModel.from_pretrained(sdxl_dir, subfolder="unet")
    for (name, a), (_, b) in zip(sdxl_unet.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in sdxl_unet.parameters())


def test_dtype_argument_and_the_fp16_vae_rule(sdxl_dir):
    half = SDXLFamily.from_pretrained(sdxl_dir, dtype="fp16")
    assert half.text_encoder.dtype == torch.float16 and half.text_encoder_2.dtype == torch.float16
    assert half.load_teacher().dtype == torch.float16
    assert half.vae.dtype == torch.float32  # SDXL's VAE says force_upcast: it stays in fp32 under fp16
    bf = SDXLFamily.from_pretrained(sdxl_dir, dtype=torch.bfloat16)
    assert bf.vae.dtype == torch.bfloat16 and bf.load_teacher().dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        SDXLFamily.from_pretrained(sdxl_dir, dtype="fp8")


def test_alternative_vae_and_tiny_vae(sdxl_dir, tmp_path):
    """The fp16-fix path (another AutoencoderKL, force_upcast off) and a tiny AutoencoderTiny for decoding."""
    torch.manual_seed(5)
    fix = tiny_sd.tiny_vae(scaling_factor=0.13025)
    fix.register_to_config(force_upcast=False)
    fix.save_pretrained(tmp_path / "vae-fix")
    taesd = tiny_sd.make_tiny_taesd(tmp_path / "taesd")
    fam = SDXLFamily.from_pretrained(sdxl_dir, dtype="fp16", vae=tmp_path / "vae-fix", tiny_vae=taesd)
    assert fam.vae.dtype == torch.float16 and fam.vae.config.force_upcast is False
    assert fam.tiny_vae.dtype == torch.float16 and fam.use_tiny_vae

    fam32 = SDXLFamily.from_pretrained(sdxl_dir, tiny_vae=taesd)
    x = initial_noise(fam32, 2, seed=0)
    fast, full = fam32.decode(x), fam32.decode(x, tiny=False)
    assert fast.shape == full.shape == (2, 3, 16, 16)
    with torch.no_grad():  # taesdxl decodes the scaled latents as they are (its scaling_factor is 1)
        expected = AutoencoderTiny.from_pretrained(taesd).decode(x).sample.clamp(-1, 1)
    torch.testing.assert_close(fast, expected)
    assert (fast - full).abs().max() > 1e-3


def test_encode_and_decode_use_the_vae_scaling_factor(sdxl):
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    vae = sdxl.vae
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(1)) * 0.13025
        decoded = vae.decode(expected / 0.13025).sample.clamp(-1, 1)
    latents = sdxl.encode(images, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(latents, expected)
    assert latents.shape == sdxl.latent_shape(2)
    torch.testing.assert_close(sdxl.decode(latents), decoded)
    torch.testing.assert_close(sdxl.decode(latents, chunk=2), decoded)


def test_missing_folder_and_wrong_family_fail_clearly(tmp_path, sd15_dir):
    with pytest.raises(ModelLoadError, match="unet/config.json"):
        SDXLFamily.from_pretrained(tmp_path / "nowhere", local_files_only=True)
    with pytest.raises(ValueError, match="text_time"):
        SDXLFamily.from_pretrained(sd15_dir)


# --- conditioning ------------------------------------------------------------------------------
def test_condition_matches_diffusers_encode_prompt(sdxl, sdxl_pipe):
    cond = sdxl.condition(PROMPTS)
    with torch.no_grad():
        pe, neg_pe, pooled, neg_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert cond["prompt_embeds"].shape == (2, tiny_sd.MAX_TOKENS, 2 * tiny_sd.TEXT_HIDDEN)  # both encoders, concatenated
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    assert cond["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2  # original size, crop (0, 0), target size
    assert (cond["prompt_embeds"][0] - cond["prompt_embeds"][1]).abs().max() > 1e-3
    null = sdxl.null_condition(3)
    assert torch.equal(null["prompt_embeds"], torch.zeros(3, *pe.shape[1:]))
    assert torch.equal(null["text_embeds"], torch.zeros(3, pooled.shape[1]))
    assert torch.equal(null["time_ids"], sdxl.add_time_ids(3))
    assert torch.equal(neg_pe, torch.zeros_like(pe)) and torch.equal(neg_pooled, torch.zeros_like(pooled))
    # a TextCondition moves and slices like a batch
    both = sdxl.cat_conditions(null, cond)
    assert both.batch_size == 5 and torch.equal(both[3:]["text_embeds"], cond["text_embeds"])
    assert isinstance(both.to("cpu"), TextCondition)


@pytest.mark.parametrize("g", [0.0, 3.0, 8.0])
def test_cfg_on_sdxl_conditioning(sdxl, sdxl_unet, g):
    """denoise(g) = x0(zero embeddings, same time ids) + g * (x0(prompt) - x0(zero embeddings))."""
    x = initial_noise(sdxl, 2, seed=1)
    t = torch.tensor([700, 300])
    cond = sdxl.condition(PROMPTS)
    with torch.no_grad():
        x0_c = _x0_by_hand(sdxl_unet, x, t, cond["prompt_embeds"],
                           {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]})
        x0_u = _x0_by_hand(sdxl_unet, x, t, torch.zeros_like(cond["prompt_embeds"]),
                           {"text_embeds": torch.zeros_like(cond["text_embeds"]), "time_ids": cond["time_ids"]})
        ours = sdxl.denoise(sdxl_unet, x, t, cond, guidance=g)
    assert (x0_c - x0_u).abs().max() > 1e-3  # the prompt must matter, or this proves nothing
    torch.testing.assert_close(ours, x0_u + g * (x0_c - x0_u), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sdxl.denoise(sdxl_unet, x, t, cond), x0_c, atol=1e-5, rtol=1e-5)


# --- bottleneck ----------------------------------------------------------------------------------
def _bottleneck_contract(fam, unet, x, t, cond, other):
    mid_out, decoder_calls = [], []
    hooks = [unet.mid_block.register_forward_hook(lambda m, i, o: mid_out.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: decoder_calls.append("up")) for b in unet.up_blocks]
    hooks.append(unet.conv_out.register_forward_hook(lambda m, i, o: decoder_calls.append("out")))
    try:
        with torch.no_grad():
            fam.model_output(unet, x, t, cond)
            assert len(mid_out) == 1 and decoder_calls == ["up"] * len(unet.up_blocks) + ["out"]  # hooks do fire
            decoder_calls.clear()
            feats = fam.bottleneck(unet, x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    assert decoder_calls == []  # the decoder half never ran
    assert feats.shape == (x.shape[0], fam.bottleneck_channels(), 4, 4)
    torch.testing.assert_close(feats, mid_out[1])
    torch.testing.assert_close(feats, mid_out[0])
    with torch.no_grad():
        assert (fam.bottleneck(unet, x, t, other) - feats).abs().max() > 1e-4  # conditioning reaches it
    x = x.clone().requires_grad_(True)
    fam.bottleneck(unet, x, t, cond).square().mean().backward()
    assert x.grad.abs().sum() > 0


def test_sdxl_bottleneck_is_the_mid_block_output(sdxl, sdxl_unet):
    cond = sdxl.condition(PROMPTS)
    other = TextCondition(cond, time_ids=cond["time_ids"] * 2)  # only the micro-conditioning differs
    _bottleneck_contract(sdxl, sdxl_unet, initial_noise(sdxl, 2, 2), torch.tensor([999, 10]), cond, other)


def test_sd15_bottleneck_is_the_mid_block_output(sd15, sd15_unet):
    _bottleneck_contract(sd15, sd15_unet, initial_noise(sd15, 2, 2), torch.tensor([999, 10]),
                         sd15.condition(PROMPTS), sd15.condition(["blue", "of"]))


# --- the student sampler against plain diffusers ----------------------------------------------------
@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [399], [999]])
def test_lcm_boundary_scalings_are_the_plain_x0_at_student_timesteps(timesteps):
    """LCM's output is c_out * x0 + c_skip * x_t with timestep_scaling 10: at t >= 249,
    c_skip <= 0.25 / 2490^2 = 4e-8 and 1 - c_out <= 2e-8, below float32 resolution relative to x0."""
    sched = LCMScheduler()
    assert sched.config.timestep_scaling == 10.0
    for t in timesteps:
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert float(c_skip) < 5e-8 and abs(1 - float(c_out)) < 5e-8


@pytest.mark.parametrize("timesteps, guidance", [([999, 749, 499, 249], 0.0), ([399], 0.0), ([999, 499], 3.0)])
def test_student_sample_matches_diffusers_lcm(sdxl, sdxl_unet, sdxl_pipe, timesteps, guidance):
    """Same start latents, same seed: LCMScheduler draws its re-noising noise from the pipeline's
    generator with the same torch.randn calls as our sampler, so whole trajectories agree."""
    x = initial_noise(sdxl, 2, seed=3)
    ours = student_sample(sdxl, sdxl_unet, sdxl.condition(PROMPTS), x, timesteps, seed=7, guidance=max(guidance, 1.0))
    theirs = sdxl_pipe(prompt=PROMPTS, timesteps=timesteps, guidance_scale=guidance, latents=x.clone(),
                       height=16, width=16, generator=torch.Generator().manual_seed(7), output_type="latent").images
    assert ours.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-5)  # x0 at t=999 divides by sqrt(ab) = 0.068
    if len(timesteps) == 4:  # and the decoded images, diffusers' postprocessing in [0, 1]
        images = sdxl_pipe(prompt=PROMPTS, timesteps=timesteps, guidance_scale=guidance, latents=x.clone(),
                           height=16, width=16, generator=torch.Generator().manual_seed(7), output_type="pt").images
        torch.testing.assert_close((sdxl.decode(ours) + 1) / 2, images, atol=1e-4, rtol=1e-4)
        other_seed = student_sample(sdxl, sdxl_unet, sdxl.condition(PROMPTS), x, timesteps, seed=8)
        assert (other_seed - ours).abs().max() > 1e-3  # the re-noising noise matters, so matching it meant something


# --- published students and our own ---------------------------------------------------------------
def test_published_sdxl_students():
    assert PUBLISHED["dmd2-sdxl-4step"].filename == "dmd2_sdxl_4step_unet_fp16.bin"
    assert PUBLISHED["dmd2-sdxl-4step"].timesteps == (999, 749, 499, 249)
    assert PUBLISHED["dmd2-sdxl-1step"].filename == "dmd2_sdxl_1step_unet_fp16.bin"
    assert PUBLISHED["dmd2-sdxl-1step"].timesteps == (399,)
    assert PUBLISHED["dmd2-sdxl-4step-lora"].filename == "dmd2_sdxl_4step_lora_fp16.safetensors"
    assert PUBLISHED["dmd2-sdxl-4step-lora"].kind == "lora"
    assert {s.repo for s in PUBLISHED.values()} == {"tianweiy/DMD2"}


def test_published_student_offline_says_what_to_download(sdxl, tmp_path):
    with pytest.raises(ModelLoadError, match=r"dmd2_sdxl_4step_unet_fp16\.bin.*tianweiy/DMD2.*hf download"):
        sdxl.load_student("dmd2-sdxl-4step", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="hf download tianweiy/DMD2 x.bin"):
        hub_file("x.bin", local_files_only=True, cache_dir=tmp_path)


def _other_unet_state(seed=1) -> dict:
    torch.manual_seed(seed)
    return {k: v.half() for k, v in tiny_sd.tiny_unet(sdxl=True).state_dict().items()}  # published files are fp16


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_full_unet_student_file_loads(sdxl, sdxl_unet, tmp_path, suffix):
    state = _other_unet_state()
    path = tmp_path / f"dmd2_sdxl_4step_unet_fp16{suffix}"
    torch.save(state, path) if suffix == ".bin" else save_file(state, str(path))
    student = sdxl.load_student(path)
    assert student.dtype == torch.float32
    loaded = student.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v.float()), k
    assert any(not torch.equal(a, b) for a, b in zip(loaded.values(), sdxl_unet.state_dict().values()))
    x = initial_noise(sdxl, 1, 0)
    assert student_sample(sdxl, student, sdxl.condition(PROMPTS[:1]), x, [999, 749, 499, 249]).isfinite().all()


class NotATensor:  # pickled by reference: torch.load(weights_only=True) must refuse to import it
    pass


def test_student_bin_is_read_with_weights_only(sdxl, tmp_path):
    state = dict(_other_unet_state(), extra=NotATensor())
    torch.save(state, tmp_path / "evil.bin")
    with pytest.raises(ModelLoadError, match="plain tensors"):
        sdxl.load_student(tmp_path / "evil.bin")


def test_student_state_dict_must_fit_the_teacher(sdxl, tmp_path):
    state = _other_unet_state()
    state.pop("conv_in.weight")
    state["unknown.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "wrong.bin")
    with pytest.raises(ModelLoadError, match=r"1 missing keys \['conv_in.weight'\], 1 unexpected keys \['unknown.weight'\]"):
        sdxl.load_student(tmp_path / "wrong.bin")
    state = _other_unet_state()
    state["conv_in.weight"] = state["conv_in.weight"][:, :3]
    torch.save(state, tmp_path / "shape.bin")
    with pytest.raises(ModelLoadError, match="does not fit"):
        sdxl.load_student(tmp_path / "shape.bin")
    with pytest.raises(ModelLoadError, match="not found"):
        sdxl.load_student(tmp_path / "absent.bin")


def test_lora_student_is_fused_into_the_teacher(sdxl, sdxl_unet, tmp_path):
    peft, kohya = fake_dmd2_lora(sdxl_unet, rank=2, alpha=1.0)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_mid_block_resnets_0_conv1.alpha" in kohya
    save_file(kohya, str(tmp_path / "dmd2_sdxl_4step_lora_fp16.safetensors"))
    student = sdxl.load_student(tmp_path / "dmd2_sdxl_4step_lora_fp16.safetensors")
    base, fused = dict(sdxl_unet.named_modules()), dict(student.named_modules())
    scale = 1.0 / 2  # alpha / rank
    targets = {k[: -len(".lora_A.weight")] for k in peft if k.endswith("lora_A.weight")}
    assert {"mid_block.resnets.0.conv1", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0", "down_blocks.0.resnets.0.time_emb_proj",
            "mid_block.attentions.0.proj_in"} <= targets
    x = torch.randn(2, 16, 4, 4)
    for name in targets:
        a, b = peft[f"{name}.lora_A.weight"].float(), peft[f"{name}.lora_B.weight"].float()
        w0, w1 = base[name].weight, fused[name].weight
        if a.ndim == 2:  # Linear: by hand, W + scale * B A
            torch.testing.assert_close(w1, w0 + scale * b @ a, atol=1e-5, rtol=1e-5)
        else:  # Conv2d: the fused conv equals the base conv plus the LoRA branch conv_B(conv_A(x))
            m = base[name]
            xi = x[:, : m.in_channels]
            lora = F.conv2d(F.conv2d(xi, a, stride=m.stride, padding=m.padding), b)
            torch.testing.assert_close(F.conv2d(xi, w1, fused[name].bias, m.stride, m.padding),
                                       m(xi) + scale * lora, atol=1e-4, rtol=1e-4)
    for name, p in sdxl_unet.named_parameters():  # every other parameter is the teacher's
        if name.rsplit(".", 1)[0] not in targets or name.endswith("bias"):
            assert torch.equal(p, student.get_parameter(name)), name

    # the diffusers key layout (our students' file: rank and alpha in the metadata) gives the same weights
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "ours", unet_lora_layers=peft, weight_name="lora.safetensors",
                                                unet_lora_adapter_metadata={"r": 2, "lora_alpha": 1.0,
                                                                            "target_modules": sorted(targets)})
    again = sdxl.load_student(tmp_path / "ours" / "lora.safetensors")
    for (name, p), q in zip(student.named_parameters(), again.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_lora_scale_and_a_foreign_lora(sdxl, sdxl_unet, tmp_path):
    _, kohya = fake_dmd2_lora(sdxl_unet)
    save_file(kohya, str(tmp_path / "lora.safetensors"))
    unchanged = sdxl.load_student(tmp_path / "lora.safetensors", lora_scale=0.0)
    assert all(torch.equal(p, q) for p, q in zip(unchanged.parameters(), sdxl_unet.parameters()))
    bad = dict(kohya, **{"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
                         "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)})
    save_file(bad, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelLoadError, match="no.such.layer"):  # all or nothing: tests/test_lora.py
        sdxl.load_student(tmp_path / "foreign.safetensors")


def test_our_student_folder_round_trip(sdxl, tmp_path):
    state = _other_unet_state(seed=3)
    student = sdxl.unet_from_state_dict(state)
    sdxl.save_student(student, tmp_path / "run-student", timesteps=[999, 749, 499, 249])
    meta = json.loads((tmp_path / "run-student" / "dmd2.json").read_text())
    assert meta["family"] == "sdxl" and meta["timesteps"] == [999, 749, 499, 249]
    again = sdxl.load_student(tmp_path / "run-student")
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "run-student")  # plain diffusers loads it too
    for (k, v), w, u in zip(student.state_dict().items(), again.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(v, w) and torch.equal(v, u), k
    assert sdxl.timesteps_of(tmp_path / "run-student") == (999, 749, 499, 249)
    assert sdxl.timesteps_of("dmd2-sdxl-1step") == (399,)


# --- SD1.5 in miniature ------------------------------------------------------------------------------
def test_sd15_family(sd15, sd15_pipe):
    assert sd15.name == "sd15" and sd15.real_guidance == 1.75 and sd15.default_guidance == 7.5
    assert sd15.latent_shape(2) == (2, 4, 8, 8) and sd15.published == {}
    cond = sd15.condition(PROMPTS)
    assert set(cond) == {"prompt_embeds"} and cond["prompt_embeds"].shape == (2, tiny_sd.MAX_TOKENS, tiny_sd.TEXT_HIDDEN)
    with torch.no_grad():
        pe, neg = sd15_pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(cond["prompt_embeds"], pe)
    torch.testing.assert_close(sd15.null_condition(2)["prompt_embeds"], neg)  # the empty prompt's embedding
    assert neg.abs().max() > 0.1


def test_sd15_cfg(sd15, sd15_unet):
    x = initial_noise(sd15, 2, seed=4)
    t = torch.tensor([800, 100])
    cond = sd15.condition(PROMPTS)
    with torch.no_grad():
        x0_c = _x0_by_hand(sd15_unet, x, t, cond["prompt_embeds"])
        x0_u = _x0_by_hand(sd15_unet, x, t, sd15.condition(["", ""])["prompt_embeds"])
        ours = sd15.denoise(sd15_unet, x, t, cond, guidance=sd15.real_guidance)
    assert (x0_c - x0_u).abs().max() > 1e-3
    torch.testing.assert_close(ours, x0_u + 1.75 * (x0_c - x0_u), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("timesteps, guidance", [([999, 749, 499, 249], 0.0), ([999, 499], 1.75)])
def test_sd15_student_sample_matches_diffusers_lcm(sd15, sd15_unet, sd15_pipe, timesteps, guidance):
    x = initial_noise(sd15, 2, seed=5)
    ours = student_sample(sd15, sd15_unet, sd15.condition(PROMPTS), x, timesteps, seed=9, guidance=max(guidance, 1.0))
    theirs = sd15_pipe(prompt=PROMPTS, timesteps=timesteps, guidance_scale=guidance, latents=x.clone(), height=16,
                       width=16, generator=torch.Generator().manual_seed(9), output_type="latent").images
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-5)


def test_sd15_full_unet_student_file(sd15, tmp_path):
    torch.manual_seed(2)
    state = {k: v.half() for k, v in tiny_sd.tiny_unet(sdxl=False).state_dict().items()}
    torch.save(state, tmp_path / "sd15_student.bin")
    loaded = sd15.load_student(tmp_path / "sd15_student.bin").state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in state.items())


def test_the_scheduler_config_is_read_and_checked(sdxl_dir, tmp_path):
    """The folder's scheduler/scheduler_config.json decides the prediction type, and a schedule the family cannot
    sample is refused by name (the config used to be skipped silently)."""
    import json
    import shutil

    from dmd2.families.sd_loading import load_configs

    _, sched = load_configs(sdxl_dir)
    assert sched["_class_name"] and sched["beta_schedule"] == "scaled_linear"
    copy = tmp_path / "v"
    shutil.copytree(sdxl_dir, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    assert SDXLFamily.from_pretrained(copy).prediction_type == "v_prediction"
    path.write_text(json.dumps({**json.loads(path.read_text()), "beta_schedule": "linear"}))
    with pytest.raises(ModelLoadError, match="beta_schedule='linear'"):
        SDXLFamily.from_pretrained(copy)
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable scheduler"):
        SDXLFamily.from_pretrained(copy)
