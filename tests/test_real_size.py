"""Real-size shapes without real weights (issue 17; slow: `make test-slow`, i.e. pytest -m slow).

UNets built from configs/real_unets/*.json with random weights, at a low resolution on CPU:
- SD1.5 (0.86B; a full generator would need 26.4 GiB before activations, more than the machine's 24):
  one DMD2 iteration through the trainer (critic step + generator step, the official GAN head
  on the real 1280-channel bottleneck, a rank-64 LoRA generator, bf16 frozen parts).
- SDXL (2.57B): the full trio with AdamW (~75 GiB, benchmarks/memory.py) does not fit in this machine's
  24 GiB; what fits: the real-size UNet in bf16 with a rank-64 LoRA and the official head on its bottleneck,
  one generator-side update (forward, GAN + denoising loss, backward, AdamW).
"""

from __future__ import annotations

import gc
import json
import resource
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import make_caption_folder

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def only_when_asked(request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("real-size models (~2 min, peak RSS 19.2 GiB): run with make test-slow (pytest -m slow)")


def real_unet(name: str, dtype=torch.float32) -> UNet2DConditionModel:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: SDXL in fp32 alone is 10 GB
    try:
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(json.loads((ROOT / f"configs/real_unets/{name}.json").read_text()))
    finally:
        torch.set_default_dtype(default)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def real_size_sd15(folder: Path) -> Path:
    """An SD1.5 pipeline folder: the real-size UNet (fp16 files, random), a 1-layer CLIP text encoder of the real
    width (768), the tests' tiny VAE (downsampling by 2) and the real DDIM scheduler."""
    import tiny_sd
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_sd.tiny_clip_tokenizer()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=tiny_sd.MAX_TOKENS,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    StableDiffusionPipeline(
        unet=real_unet("sd15", torch.float16), vae=tiny_sd.tiny_vae(scaling_factor=0.18215), text_encoder=text,
        tokenizer=tok, scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    gc.collect()
    return folder


def test_sd15_real_size_one_dmd2_iteration_lora64_official_head(tmp_path):
    from training.config import DistillConfig
    from training.trainer import DMD2Trainer

    pipe = real_size_sd15(tmp_path / "sd15")
    cfg = DistillConfig(family="sd15", teacher=str(pipe), data=str(make_caption_folder(tmp_path / "data")),
                        latent_cache_dir=str(tmp_path / "cache"), resolution=64, batch_size=1, iterations=1, ttur=1,
                        lora_rank=64, lora_alpha=8.0, frozen_dtype="bf16", mixed_precision="bf16",
                        real_guidance=1.75, gan_generator_weight=1e-3, gan_critic_weight=1e-2, gan_head="official",
                        warmup_steps=0, ema_decay=0.0, generator_lr=1e-3, critic_lr=1e-3, sample_every=0,
                        eval_every=0, checkpoint_every=0).validate()
    tr = DMD2Trainer(cfg)
    gen, critic = tr.generator_module, tr.critic_module
    assert sum(p.numel() for p in tr.real_unet.parameters()) == 859_520_964
    lora = {n: p.detach().clone() for n, p in gen.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    base = {n: p.detach().clone() for n, p in gen.named_parameters() if "lora_" not in n and
            ("conv_in." in n or "mid_block.attentions.0.proj_in." in n)}
    watched = ("fake_unet.conv_in.weight", "fake_unet.mid_block.attentions.0.proj_in.weight", "gan_head.net.0.weight")
    crit = {n: p.detach().clone() for n, p in critic.named_parameters() if n in watched}
    teacher = tr.real_unet.conv_in.weight.detach().clone()

    # Shapes: latents 32x32 -> the real 1280-channel bottleneck at 4x4 -> the official head: one logit each.
    x, cond = tr.real_batch()
    assert x.shape == (1, 4, 32, 32)
    with torch.no_grad(), tr.autocast():
        feats = tr.family.bottleneck(critic.fake_unet, x, torch.tensor([500]), cond)
        assert feats.shape == (1, 1280, 4, 4)
        assert critic.gan_head(feats).shape == (1,)

    stats = tr.train_step()
    assert {"critic/fake_denoise", "critic/gan_critic", "generator/dm", "generator/gan_generator"} <= set(stats)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    # The LoRA trained: every lora_B left zero (lora_A gets no gradient while B = 0; only weight decay moves it).
    b = [n for n in lora if "lora_B" in n]
    assert b and all(lora[n].abs().sum() == 0 and p.abs().sum() > 0 for n, p in gen.named_parameters() if n in b)
    assert base
    assert all(torch.equal(p, base[n]) for n, p in gen.named_parameters() if n in base)  # its base did not
    assert all(not torch.equal(p, crit[n]) for n, p in critic.named_parameters() if n in crit)  # fake score + head
    assert torch.equal(tr.real_unet.conv_in.weight, teacher)  # the teacher never trains
    print(f"\nSD1.5 real-size iteration: peak RSS {peak_rss_gib():.1f} GiB")


def test_sdxl_real_size_unet_lora64_and_official_head_one_update():
    from training.critic import OfficialGanHead
    from training.lora import add_lora
    from dmd2.families.sdxl import SDXLFamily

    unet = real_unet("sdxl-base", torch.bfloat16).requires_grad_(False)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    add_lora(unet, 64, 8.0, SDXLFamily.lora_target_modules, base_dtype=torch.bfloat16)
    lora = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert 190e6 < sum(p.numel() for p in lora.values()) < 200e6  # 196.8M, as benchmarks/memory.py counts
    head = OfficialGanHead(1280, 8)
    features = {}
    unet.mid_block.register_forward_hook(lambda m, i, o: features.update(mid=o))

    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32)  # 256 px latents: bottleneck 8x8
    added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 8, 2048), added_cond_kwargs=added).sample
        assert features["mid"].shape == (1, 1280, 8, 8)
        logit = head(features["mid"])
    assert out.shape == x.shape and torch.isfinite(out.float()).all() and logit.shape == (1,)
    loss = torch.nn.functional.softplus(-logit).mean() + out.float().pow(2).mean()
    loss.backward()
    before = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    opt = torch.optim.AdamW([*lora.values(), *head.parameters()], lr=1e-3)
    head_before = head.net[0].weight.detach().clone()
    opt.step()
    assert all(torch.isfinite(p.grad).all() for p in lora.values() if p.grad is not None)
    assert sum(not torch.equal(p, before[n]) for n, p in lora.items() if n in before) > 0.9 * len(before)
    assert not torch.equal(head.net[0].weight, head_before)
    print(f"\nSDXL real-size LoRA update: peak RSS {peak_rss_gib():.1f} GiB")
