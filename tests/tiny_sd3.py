"""A tiny random StableDiffusion3Pipeline saved as a diffusers folder, built offline from configs.

Every component has the real class and layout of SD3 medium (two CLIP text encoders with projection,
a T5 encoder, an SD3Transformer2DModel (MMDiT), an AutoencoderKL with SD3's shift_factor and
scaling_factor, FlowMatchEulerDiscreteScheduler with shift 3) but only a few thousand parameters.
The CLIP BPE tokenizers are tests/tiny_sd.py's; the T5 tokenizer is a tiny Unigram vocabulary built
here (transformers' T5Tokenizer from a list of pieces), so nothing comes from the Hub.
Widths are chosen so the pipeline's padding matters: CLIP-L + CLIP-G hidden (8 + 8) is zero-padded
to the T5 width (24) before the sequences are concatenated.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from tiny_sd import LATENT_SIZE, PROJECTION_DIM, WORDS, _text_config, tiny_clip_tokenizer

T5_WIDTH = 24            # joint_attention_dim: SD3's T5-XXL has 4096 (CLIP-L + CLIP-G hidden = 768 + 1280)
LATENT_CHANNELS = 4      # SD3 has 16
NUM_LAYERS = 4           # SD3 medium has 24; the GAN's bottleneck is after block NUM_LAYERS // 2 - 1
SHIFT = 3.0              # SD3's timestep shift at 1024 px (Esser et al. 2024; the medium repo's scheduler)
SHIFT_FACTOR, SCALING_FACTOR = 0.0609, 1.5305  # SD3's VAE (stabilityai/stable-diffusion-3-medium-diffusers)


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer over whole words, letters and digits: pad 0, eos 1, unk 2, as T5's."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def tiny_transformer(seed: int | None = None) -> SD3Transformer2DModel:
    """SD3's MMDiT at 4 layers of width 8 on 8x8 latents (4x4 tokens of 2x2 patches)."""
    if seed is not None:
        torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS,
                                 num_layers=NUM_LAYERS, attention_head_dim=4, num_attention_heads=2,
                                 joint_attention_dim=T5_WIDTH, caption_projection_dim=8,
                                 pooled_projection_dim=2 * PROJECTION_DIM, out_channels=LATENT_CHANNELS,
                                 pos_embed_max_size=LATENT_SIZE)


def tiny_sd3_vae() -> AutoencoderKL:
    """SD3's VAE layout (no quant convs, shift_factor), downsampling by 2."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=2, sample_size=2 * LATENT_SIZE,
                         scaling_factor=SCALING_FACTOR, shift_factor=SHIFT_FACTOR, use_quant_conv=False,
                         use_post_quant_conv=False, force_upcast=True)


def tiny_sd3_pipeline(seed: int = 0, shift: float = SHIFT) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    tok, tok2, tok3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(pad_token="!"), tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=tiny_transformer().eval(), vae=tiny_sd3_vae().eval(),
        text_encoder=CLIPTextModelWithProjection(_text_config(tok)).eval(), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tok2)).eval(), tokenizer_2=tok2,
        text_encoder_3=tiny_t5(tok3).eval(), tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))


def make_tiny_sd3(folder, seed: int = 0, shift: float = SHIFT) -> Path:
    """Save a tiny random SD3 pipeline (diffusers layout, safetensors) into `folder`."""
    folder = Path(folder)
    tiny_sd3_pipeline(seed, shift).save_pretrained(folder)
    return folder

