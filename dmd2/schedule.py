"""The 1000-step DDPM noise schedule shared by teachers, students and the DMD2 losses."""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000


def _betas(kind: str, num_steps: int) -> torch.Tensor:
    if kind == "linear":  # DDPM (Ho et al. 2020)
        return torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    if kind == "scaled_linear":  # Stable Diffusion 1.x / XL
        return torch.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=torch.float64) ** 2
    if kind == "cosine":  # improved DDPM (Nichol & Dhariwal 2021), diffusers' "squaredcos_cap_v2"
        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}: expected 'linear', 'scaled_linear' or 'cosine'")


class NoiseSchedule:
    """alphas_cumprod of a discrete DDPM schedule and the conversions between x0, eps, v and x_t."""

    def __init__(self, kind: str = "scaled_linear", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.kind = kind
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - _betas(kind, num_train_timesteps), 0).float()

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), shaped to broadcast against `like`."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        ab = self.alphas_cumprod[t].to(device=like.device, dtype=torch.float32)
        ab = ab.reshape(-1, *([1] * (like.ndim - 1)))
        return ab.sqrt(), (1 - ab).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps."""
        a, s = self._coefs(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def eps_to_x0(self, x_t, eps, t):
        a, s = self._coefs(t, x_t)
        return ((x_t.float() - s * eps.float()) / a).to(x_t.dtype)

    def x0_to_eps(self, x_t, x0, t):
        a, s = self._coefs(t, x_t)
        return ((x_t.float() - a * x0.float()) / s).to(x_t.dtype)

    def v_to_x0(self, x_t, v, t):
        a, s = self._coefs(t, x_t)
        return (a * x_t.float() - s * v.float()).to(x_t.dtype)

    def velocity(self, x0, noise, t):
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 (Salimans & Ho 2022)."""
        a, s = self._coefs(t, x0)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def to_x0(self, x_t, model_output, t, prediction_type: str):
        """Convert a network output of the given prediction type to an x0 estimate."""
        if prediction_type == "epsilon":
            return self.eps_to_x0(x_t, model_output, t)
        if prediction_type == "v_prediction":
            return self.v_to_x0(x_t, model_output, t)
        if prediction_type == "sample":
            return model_output
        raise ValueError(f"unknown prediction type {prediction_type!r}")

    def target(self, x0, noise, t, prediction_type: str):
        """The regression target of a denoising network of the given prediction type."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        if prediction_type == "sample":
            return x0
        raise ValueError(f"unknown prediction type {prediction_type!r}")


def student_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, first: int | None = None) -> list[int]:
    """Timesteps of a few-step student: 1 -> [999]; 4 -> [999, 749, 499, 249].

    `first` overrides the single timestep of a 1-step student (SDXL's official one uses 399).
    """
    if num_steps < 1:
        raise ValueError(f"a student needs at least 1 step, got {num_steps}")
    if num_steps == 1 and first is not None:
        return [int(first)]
    stride = num_train_timesteps // num_steps
    return [num_train_timesteps - 1 - i * stride for i in range(num_steps)]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Evenly spaced "trailing" DDIM timesteps, always starting at T-1 (so 1 step starts from pure noise)."""
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1, got {num_steps}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"steps must be at most {num_train_timesteps}, got {num_steps}")
    ts = [round(num_train_timesteps - i * num_train_timesteps / num_steps) - 1 for i in range(num_steps)]
    return ts
