"""SDXL: two CLIP text encoders, micro-conditioning (add_time_ids), VAE latents; DMD2's published students.

Teacher: any diffusers SDXL folder or Hub repo (`stabilityai/stable-diffusion-xl-base-1.0`).
Students (Hub repo `tianweiy/DMD2`):
- `dmd2-sdxl-4step`: `dmd2_sdxl_4step_unet_fp16.bin`, a full UNet, timesteps 999, 749, 499, 249;
- `dmd2-sdxl-1step`: `dmd2_sdxl_1step_unet_fp16.bin`, a full UNet conditioned on t=399;
- `dmd2-sdxl-4step-lora`: `dmd2_sdxl_4step_lora_fp16.safetensors`, a kohya-format LoRA
  (rank 64, alpha 8) fused into the teacher UNet, timesteps 999, 749, 499, 249.
All three sample with `dmd2.sampling.student_sample` (denoise, re-noise with fresh noise), which
is what diffusers' LCMScheduler does with `timesteps=[...]` and guidance off (tests/test_sdxl.py).

Guidance: `real_guidance = 8.0` is the CFG scale of DMD2's real score for SDXL (paper and
official scripts, `--real_guidance_scale 8`); `default_guidance = 5.0` is for sampling the
teacher itself (diffusers' StableDiffusionXLPipeline default). The unconditional input is
DMD2's and diffusers' (`force_zeros_for_empty_prompt`): zero text and pooled embeddings, the
same add_time_ids.
"""

from __future__ import annotations

import torch

from dmd2.families.sd import PublishedStudent, StableDiffusionFamily, TextCondition, resolve_device_dtype
from dmd2.families.sd_loading import load_configs, load_part, load_vaes
from dmd2.hub import hub_kwargs
from dmd2.schedule import student_timesteps

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"  # an AutoencoderKL that is safe in fp16
TAESDXL = "madebyollin/taesdxl"                       # AutoencoderTiny for fast previews

FOUR_STEPS = tuple(student_timesteps(4))              # 999, 749, 499, 249
PUBLISHED = {
    "dmd2-sdxl-4step": PublishedStudent("dmd2_sdxl_4step_unet_fp16.bin", "unet", FOUR_STEPS),
    "dmd2-sdxl-1step": PublishedStudent("dmd2_sdxl_1step_unet_fp16.bin", "unet", tuple(student_timesteps(1, first=399))),
    "dmd2-sdxl-4step-lora": PublishedStudent("dmd2_sdxl_4step_lora_fp16.safetensors", "lora", FOUR_STEPS),
}


class SDXLFamily(StableDiffusionFamily):
    """SDXL behind the `Family` interface; build it with `SDXLFamily.from_pretrained(folder_or_repo)`."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    published = PUBLISHED
    real_guidance = 8.0
    default_guidance = 5.0

    def __init__(self, source, *, text_encoder, text_encoder_2, tokenizer, tokenizer_2, **kwargs):
        super().__init__(source, **kwargs)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        _check_sdxl_unet(source, self.unet_config)

    @classmethod
    def from_pretrained(cls, source=SDXL_BASE, *, device=None, dtype=None, vae=None, vae_subfolder=None,
                        tiny_vae=None, height=None, width=None, **kwargs) -> "SDXLFamily":
        """Text encoders, tokenizers and VAE of an SDXL folder or Hub repo, in `dtype` on `device`
        (default fp16 on CUDA, fp32 on CPU). `vae`: another AutoencoderKL (e.g. SDXL_VAE_FP16_FIX);
        `tiny_vae`: an AutoencoderTiny (e.g. TAESDXL), then used by `decode`. kwargs go to every
        from_pretrained (revision, local_files_only, cache_dir, ...; variant="fp16" only to the text
        encoders and, through `load_teacher`, the UNet)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        device, dtype = resolve_device_dtype(device, dtype)
        unet_config, sched = load_configs(source, cls.unet_subfolder, **hub_kwargs(kwargs))
        _check_sdxl_unet(source, unet_config)  # before loading anything big
        te = load_part(CLIPTextModel, source, subfolder="text_encoder", dtype=dtype, **kwargs)
        te2 = load_part(CLIPTextModelWithProjection, source, subfolder="text_encoder_2", dtype=dtype, **kwargs)
        tok = load_part(CLIPTokenizer, source, subfolder="tokenizer", **hub_kwargs(kwargs))
        tok2 = load_part(CLIPTokenizer, source, subfolder="tokenizer_2", **hub_kwargs(kwargs))
        kl, tiny = load_vaes(source, device, dtype, vae=vae, vae_subfolder=vae_subfolder, tiny_vae=tiny_vae,
                             **hub_kwargs(kwargs))
        return cls(source, text_encoder=te.to(device).eval().requires_grad_(False),
                   text_encoder_2=te2.to(device).eval().requires_grad_(False), tokenizer=tok, tokenizer_2=tok2,
                   vae=kl, tiny_vae=tiny, unet_config=unet_config, scheduler_config=sched, device=device,
                   dtype=dtype, height=height, width=width, load_kwargs=kwargs)

    # --- conditioning -----------------------------------------------------------------------
    def add_time_ids(self, n: int) -> torch.Tensor:
        """SDXL micro-conditioning: original size (h, w), crop top-left (0, 0), target size (h, w)."""
        ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]], dtype=torch.float32)
        return ids.repeat(n, 1).to(self.device)

    def _tokens(self, tokenizer, prompts):
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def condition(self, prompts) -> TextCondition:
        """Prompts -> prompt_embeds (both encoders' penultimate hidden states, concatenated),
        text_embeds (the second encoder's projected pooled output), time_ids (for the family's size)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out1 = self.text_encoder(self._tokens(self.tokenizer, prompts), output_hidden_states=True)
        out2 = self.text_encoder_2(self._tokens(self.tokenizer_2, prompts), output_hidden_states=True)
        prompt_embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return TextCondition(prompt_embeds=prompt_embeds, text_embeds=out2.text_embeds,
                             time_ids=self.add_time_ids(len(prompts)))

    def null_condition(self, n: int) -> TextCondition:
        """DMD2's unconditional input for SDXL: zero embeddings, the same micro-conditioning."""
        seq = self.tokenizer.model_max_length
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        dtype = self.text_encoder_2.dtype
        return TextCondition(prompt_embeds=torch.zeros(n, seq, width, dtype=dtype, device=self.device),
                             text_embeds=torch.zeros(n, self.text_encoder_2.config.projection_dim, dtype=dtype,
                                                     device=self.device),
                             time_ids=self.add_time_ids(n))

    def added_cond_kwargs(self, cond, device, dtype) -> dict:
        return {"text_embeds": cond["text_embeds"].to(device, dtype), "time_ids": cond["time_ids"].to(device, dtype)}


def _check_sdxl_unet(source, unet_config: dict) -> None:
    kind = unet_config.get("addition_embed_type")
    if kind != "text_time":
        raise ValueError(f"{source}: the UNet's addition_embed_type is {kind!r}, not SDXL's 'text_time' "
                         f"(an SD1.x folder? use SD15Family)")

