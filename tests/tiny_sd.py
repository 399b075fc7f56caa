"""Tiny random SDXL / SD1.5 pipelines saved as diffusers folders, built offline from configs.

Every component has the real class and the real layout of its big sibling (two CLIP text
encoders + `text_time` micro-conditioning for SDXL, one encoder for SD1.5, AutoencoderKL,
EulerDiscrete / DDIM scheduler configs, CLIP BPE tokenizers) but only a few thousand
parameters, so the real loaders can be tested on 2 busy CPU cores without the Hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, AutoencoderTiny, DDIMScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 16          # the real CLIP tokenizers use 77
TEXT_HIDDEN = 8          # per text encoder; SDXL's cross-attention width is the sum of both
PROJECTION_DIM = 8       # pooled text embedding of SDXL's second encoder
TIME_EMBED_DIM = 4       # per micro-conditioning number; SDXL has 6 (orig. size, crop, target size)
LATENT_SIZE = 8          # latents are 8x8, images 16x16 (the tiny VAE downsamples by 2)
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte maps to one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP BPE tokenizer over all bytes plus a few whole words, with no file from the Hub."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge each word left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        for i in range(1, len(word)):
            left, right = word[:i], word[i] + ("</w>" if i == len(word) - 1 else "")
            merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_TOKENS)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=16,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                          projection_dim=PROJECTION_DIM, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def tiny_vae(scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=2, sample_size=2 * LATENT_SIZE,
                         scaling_factor=scaling_factor, force_upcast=True)


def tiny_unet(sdxl: bool) -> UNet2DConditionModel:
    """SDXL: linear projections, `text_time` added conditioning; SD1.5: conv projections, no added conditioning."""
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
                 projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
                 use_linear_projection=True, cross_attention_dim=2 * TEXT_HIDDEN) if sdxl else \
        dict(cross_attention_dim=TEXT_HIDDEN)
    down = ("DownBlock2D", "CrossAttnDownBlock2D") if sdxl else ("CrossAttnDownBlock2D", "DownBlock2D")
    up = ("CrossAttnUpBlock2D", "UpBlock2D") if sdxl else ("UpBlock2D", "CrossAttnUpBlock2D")
    return UNet2DConditionModel(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, down_block_types=down,
                                up_block_types=up, block_out_channels=(4, 8), layers_per_block=1,
                                norm_num_groups=2, attention_head_dim=2, **extra)


def tiny_sdxl_components(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tok, tok2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!"
    return dict(
        unet=tiny_unet(sdxl=True).eval(),
        vae=tiny_vae(scaling_factor=0.13025).eval(),
        text_encoder=CLIPTextModel(_text_config(tok)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok2)).eval(),
        tokenizer=tok, tokenizer_2=tok2,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
    )


def make_tiny_sdxl(folder, seed: int = 0) -> Path:
    """Save a tiny random SDXL pipeline (diffusers layout, safetensors) into `folder`."""
    folder = Path(folder)
    StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False).save_pretrained(folder)
    return folder


def make_tiny_sd15(folder, seed: int = 0) -> Path:
    """Save a tiny random SD1.5 pipeline (diffusers layout, safetensors, no safety checker) into `folder`."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tok = tiny_clip_tokenizer()
    StableDiffusionPipeline(
        unet=tiny_unet(sdxl=False).eval(), vae=tiny_vae(scaling_factor=0.18215).eval(),
        text_encoder=CLIPTextModel(_text_config(tok)).eval(), tokenizer=tok,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def make_tiny_taesd(folder, seed: int = 0) -> Path:
    """Save a tiny random AutoencoderTiny (the taesdxl / taesd architecture) that downsamples by 2."""
    folder = Path(folder)
    torch.manual_seed(seed)
    AutoencoderTiny(encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    return folder


# --- shared by the text families' trainer tests (test_distill_sd, test_sd3, test_flux) ---------------------------
def text_config(world, family: str, real_guidance: float, **overrides):
    """A two-iteration DMD2 config on `world[family]`'s tiny pipeline, its captioned images and prompts."""
    from training.config import DistillConfig

    teacher = overrides.pop("teacher", None) or str(world[family])
    base = dict(family=family, teacher=teacher, data=str(world["data"]), prompts=str(world["prompts"]),
                latent_cache_dir=str(world["cache"]), batch_size=2, iterations=2, ttur=1, warmup_steps=1, log_every=1,
                sample_every=2, eval_every=0, checkpoint_every=2, mixed_precision="no", ema_decay=0.0,
                generator_lr=1e-3, critic_lr=1e-3, real_guidance=real_guidance, gan_generator_weight=5e-3)
    base.update(overrides)
    return DistillConfig(**base).validate()


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def moved(before: dict, module) -> set[str]:
    """The names of the entries of `module`'s state dict that differ from `before`."""
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}
