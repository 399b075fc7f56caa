"""A tiny random FluxPipeline saved as a diffusers folder, built offline from configs.

The real classes and layout of FLUX.1-dev (CLIPTextModel + CLIP BPE tokenizer, T5EncoderModel + a T5 tokenizer,
FluxTransformer2DModel with guidance embeddings, a 16-channel-style AutoencoderKL with shift_factor, and a
FlowMatchEulerDiscreteScheduler with dynamic shifting) with a few thousand parameters: 16 px images, 8x8
latents of 4 channels, 16 image tokens of 2x2 patches; one double-stream and three single-stream blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

import tiny_sd

LATENT_CHANNELS = 4      # FLUX.1: 16
T5_DIM = 8               # FLUX.1: 4096 (t5-v1_1-xxl)
IMAGE_SIZE = 16          # the tiny VAE downsamples by 2: 8x8 latents, 4x4 = 16 tokens
MAX_SEQUENCE_LENGTH = 32  # T5 tokens the tests encode (FluxPipeline's default is 512)
T5_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "in")


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 SentencePiece-style Unigram tokenizer (pad 0, eos 1, unk 2, then whole words and single letters with
    their scores) that appends </s> as T5's does, built from a vocabulary list (no file from the Hub)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in T5_WORDS]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581" + c, -3.5) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_transformer(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """FLUX's transformer with 2 heads of 8 (rope axes 2 + 2 + 4), one double-stream and three single-stream blocks."""
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
                                  pooled_projection_dim=tiny_sd.TEXT_HIDDEN, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(2, 2, 4))


def tiny_flux_vae() -> AutoencoderKL:
    """FLUX's VAE layout (no quant convs, shift_factor and scaling_factor of FLUX.1), downsampling by 2."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=2, sample_size=IMAGE_SIZE,
                         scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                         force_upcast=True)


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True) -> dict:
    torch.manual_seed(seed)
    clip_tok, t5_tok = tiny_sd.tiny_clip_tokenizer(), tiny_t5_tokenizer()
    t5 = T5Config(vocab_size=len(t5_tok), d_model=T5_DIM, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    scheduler = (FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                 base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                 max_image_seq_len=4096) if guidance_embeds else
                 FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False))
    return dict(transformer=tiny_transformer(guidance_embeds).eval(), vae=tiny_flux_vae().eval(),
                text_encoder=CLIPTextModel(tiny_sd._text_config(clip_tok)).eval(), tokenizer=clip_tok,
                text_encoder_2=T5EncoderModel(t5).eval(), tokenizer_2=t5_tok, scheduler=scheduler)


def make_tiny_flux(folder, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a tiny random FluxPipeline (diffusers layout, safetensors) into `folder`; guidance_embeds=False gives a
    FLUX.1-schnell-like pipeline (no guidance input, a fixed-shift scheduler)."""
    folder = Path(folder)
    FluxPipeline(**tiny_flux_components(seed, guidance_embeds)).save_pretrained(folder)
    return folder
