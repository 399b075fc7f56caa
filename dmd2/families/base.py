"""The small interface that lets losses, samplers, the trainer and the app ignore the model family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dmd2.schedule import Schedule


class ModelLoadError(RuntimeError):
    """A model folder or weight file is missing, unreadable or does not match its config."""


def read_json_object(path) -> dict:
    """A JSON file that must hold an object (config.json, dmd2.json, scheduler_config.json, ...); ModelLoadError
    naming the file when it cannot be read, is not JSON, or is not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return data


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DDP wrapper (its `.module`); any other module as it is."""
    return getattr(module, "module", module)


def _is_one(guidance) -> bool:
    """Is the CFG scale exactly 1 (no CFG pass)? A scale may be a number or one per sample."""
    if isinstance(guidance, torch.Tensor):
        return bool((guidance == 1).all())
    return guidance == 1.0


class Family:
    """Base class of a model family (pixel class-conditional, SDXL, ...).

    Subclasses set `schedule`, `prediction_type` and `default_guidance`, and implement the
    conditioning, the raw network call and loading/saving. `denoise` and CFG live here once.
    """

    name: str = "base"
    schedule: Schedule
    prediction_type: str = "epsilon"
    default_guidance: float = 1.0

    # --- data space ---------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, C, H, W) -> the space the UNet works in."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """UNet space -> images in [-1, 1]."""
        return x.clamp(-1, 1)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        raise NotImplementedError

    # --- conditioning -------------------------------------------------------------------
    def condition(self, spec: Any) -> Any:
        """Labels, prompts or a batch -> the conditioning the UNet takes."""
        raise NotImplementedError

    def null_condition(self, n: int) -> Any:
        """The unconditional input for classifier-free guidance."""
        raise NotImplementedError

    def cat_conditions(self, a: Any, b: Any) -> Any:
        """Stack two conditions along the batch (for one CFG forward pass)."""
        return torch.cat([a, b])

    # --- networks -----------------------------------------------------------------------
    # `guidance_input` (a number or one per sample): the guidance scale w that a guidance-conditioned network
    # takes as an input (dmd2/guidance.py); None for every other network.
    def model_output(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                     guidance_input=None) -> torch.Tensor:
        """The raw network output (eps, v or x0, as `prediction_type` says)."""
        raise NotImplementedError

    def bottleneck(self, unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                   guidance_input=None) -> torch.Tensor:
        """Mid-block features (the forward stops there), for the GAN head."""
        raise NotImplementedError

    def guidance_conditioned(self, unet: torch.nn.Module, dim: int) -> torch.nn.Module:
        """A copy of `unet` that also takes the guidance scale as an input, through a zero-initialised
        projection (so it starts out computing exactly what `unet` does)."""
        raise NotImplementedError(f"family {self.name} has no guidance-conditioned networks")

    def denoise(self, unet: torch.nn.Module, x_t: torch.Tensor, t, cond: Any, guidance=1.0,
                guidance_input=None) -> torch.Tensor:
        """x0 estimate; with guidance != 1 (a number or one per sample), classifier-free guidance in one
        batched forward; `guidance_input`: w for a guidance-conditioned network (no CFG pass)."""
        t = self.schedule.timesteps(t, x_t.shape[0], x_t.device)
        if _is_one(guidance):
            out = self.model_output(unet, x_t, t, cond, guidance_input=guidance_input)
            return self.schedule.to_x0(x_t, out, t, self.prediction_type)
        if guidance_input is not None:
            raise ValueError("a guidance-conditioned network takes its guidance as an input, not through CFG")
        both = self.cat_conditions(self.null_condition(x_t.shape[0]), cond)
        out = self.model_output(unet, torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        x0_uncond, x0_cond = self.schedule.to_x0(torch.cat([x_t, x_t]), out, torch.cat([t, t]), self.prediction_type).chunk(2)
        if isinstance(guidance, torch.Tensor):  # one scale per sample
            guidance = guidance.to(x0_cond.device, torch.float32).reshape(-1, *([1] * (x0_cond.ndim - 1)))
        # CFG is linear in the network output, and x0 is affine in it at fixed (x_t, t), so
        # guiding x0 equals guiding eps or v.
        return x0_uncond + guidance * (x0_cond - x0_uncond)

    # --- training (used by training/distill.py) ------------------------------------------
    lora_target_modules: tuple[str, ...] = ()  # default LoRA targets (module name suffixes); () = no LoRA

    @classmethod
    def for_training(cls, teacher: str | Path, *, device=None, frozen_dtype: torch.dtype = torch.float32,
                     resolution: int | None = None) -> tuple["Family", torch.nn.Module]:
        """The family and its teacher UNet (fp32, frozen) for distillation.

        `teacher`: a diffusers folder or Hub repo; `frozen_dtype`: the parts that never train
        (text encoders, VAE); `resolution`: the image size to train at (None: the teacher's).
        """
        raise NotImplementedError

    # --- weights ------------------------------------------------------------------------
    def load_teacher(self, path: str | Path, **kwargs) -> torch.nn.Module:
        raise NotImplementedError

    def load_student(self, path: str | Path, **kwargs) -> torch.nn.Module:
        raise NotImplementedError

    def save_student(self, unet: torch.nn.Module, path: str | Path, **kwargs) -> None:
        raise NotImplementedError
