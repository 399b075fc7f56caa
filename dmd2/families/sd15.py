"""Stable Diffusion 1.5: one CLIP text encoder (last hidden state), no added conditioning, VAE latents.

Guidance: `real_guidance = 1.75` is the CFG scale of DMD2's real score for SD1.5 (paper and the
official `experiments/sdv1.5` scripts); `default_guidance = 7.5` is for sampling the teacher
itself (diffusers' StableDiffusionPipeline default). The unconditional input, as in DMD2's
`train_sd.py`, is the text encoder's embedding of the empty prompt "".
DMD2 published no SD1.5 student in diffusers format, so `published` is empty; our own runs
load with `load_student(folder)`.
"""

from __future__ import annotations

import torch

from dmd2.families.sd import StableDiffusionFamily, TextCondition, resolve_device_dtype
from dmd2.families.sd_loading import load_configs, load_part, load_vaes
from dmd2.hub import hub_kwargs

SD15_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TAESD = "madebyollin/taesd"


class SD15Family(StableDiffusionFamily):
    """SD1.5 behind the `Family` interface; build it with `SD15Family.from_pretrained(folder_or_repo)`."""

    name = "sd15"
    real_guidance = 1.75
    default_guidance = 7.5

    def __init__(self, source, *, text_encoder, tokenizer, **kwargs):
        super().__init__(source, **kwargs)
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self._empty: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, source=SD15_BASE, *, device=None, dtype=None, vae=None, vae_subfolder=None,
                        tiny_vae=None, height=None, width=None, **kwargs) -> "SD15Family":
        """Text encoder, tokenizer and VAE of an SD1.x folder or Hub repo (see SDXLFamily.from_pretrained)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        device, dtype = resolve_device_dtype(device, dtype)
        unet_config, sched = load_configs(source, cls.unet_subfolder, **hub_kwargs(kwargs))
        te = load_part(CLIPTextModel, source, subfolder="text_encoder", dtype=dtype, **kwargs)
        tok = load_part(CLIPTokenizer, source, subfolder="tokenizer", **hub_kwargs(kwargs))
        kl, tiny = load_vaes(source, device, dtype, vae=vae, vae_subfolder=vae_subfolder, tiny_vae=tiny_vae,
                             **hub_kwargs(kwargs))
        return cls(source, text_encoder=te.to(device).eval().requires_grad_(False), tokenizer=tok, vae=kl,
                   tiny_vae=tiny, unet_config=unet_config, scheduler_config=sched, device=device, dtype=dtype,
                   height=height, width=width, load_kwargs=kwargs)

    @torch.no_grad()
    def condition(self, prompts) -> TextCondition:
        """Prompts -> prompt_embeds: the text encoder's last hidden state (after its final layer norm)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        return TextCondition(prompt_embeds=self.text_encoder(ids)[0])

    def null_condition(self, n: int) -> TextCondition:
        """The embedding of the empty prompt, computed once."""
        if self._empty is None:
            self._empty = self.condition([""])["prompt_embeds"]
        return TextCondition(prompt_embeds=self._empty.expand(n, -1, -1))
