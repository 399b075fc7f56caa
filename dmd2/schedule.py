"""Noise schedules shared by teachers, students and the DMD2 losses: x_t = alpha(t) x0 + sigma(t) eps.

Two kinds behind one interface, so the losses, backward simulation and samplers never ask which:
- `NoiseSchedule`: a discrete DDPM schedule (linear, scaled linear, cosine), alpha = sqrt(alpha_bar_t),
  sigma = sqrt(1 - alpha_bar_t); networks take the integer timestep.
- `FlowSchedule`: rectified flow (SD3, FLUX), alpha = 1 - s, sigma = s, with the timestep shift
  s = shift * u / (1 + (shift - 1) u) of the uniform u = (t + 1) / T; networks take s * T (diffusers).
Timesteps t are on one scale for both, 0 .. T-1 (t = T-1 is pure noise), so student timesteps
(999, 749, 499, 249), the DMD range U[0.02T, 0.98T] and the GAN's noise levels mean the same thing;
for a flow teacher they follow its shifted schedule.
Predictions (eps, v, x0, flow velocity u = eps - x0) are converted to x0 and back in one place here.
"""

from __future__ import annotations

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


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


class Schedule:
    """x_t = alpha(t) x0 + sigma(t) eps and the conversions between x0, eps, v, u and x_t.

    Subclasses give `alpha_sigma(t)`, `model_timestep(t)` (what the network takes) and
    `sampling_timesteps(steps)` (the teacher sampler's grid)."""

    kind: str
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    timestep_dtype: torch.dtype = torch.long

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input of the network at schedule timestep t."""
        raise NotImplementedError

    def sampling_timesteps(self, steps: int) -> list:
        """The teacher sampler's timesteps for `steps` network evaluations, noisiest first."""
        raise NotImplementedError

    def timesteps(self, t, n: int, device) -> torch.Tensor:
        """t (a number or one per sample) as a tensor of n timesteps on `device`."""
        return torch.as_tensor(t, device=device).to(self.timestep_dtype).expand(n)

    def _coefs(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t) and sigma(t) in fp32, shaped to broadcast against `like`."""
        a, s = self.alpha_sigma(torch.as_tensor(t))
        shape = (-1, *([1] * (like.ndim - 1)))
        return (a.to(device=like.device, dtype=torch.float32).reshape(shape),
                s.to(device=like.device, dtype=torch.float32).reshape(shape))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps."""
        a, s = self._coefs(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def eps_to_x0(self, x_t, eps, t):
        a, s = self._coefs(t, x_t)
        return ((x_t.float() - s * eps.float()) / a).to(x_t.dtype)

    def x0_to_eps(self, x_t, x0, t):
        a, s = self._coefs(t, x_t)
        return ((x_t.float() - a * x0.float()) / s).to(x_t.dtype)

    def v_to_x0(self, x_t, v, t):
        """x0 from v = alpha eps - sigma x0 (Salimans & Ho 2022; a variance-preserving schedule: a^2 + s^2 = 1)."""
        a, s = self._coefs(t, x_t)
        return (a * x_t.float() - s * v.float()).to(x_t.dtype)

    def velocity(self, x0, noise, t):
        """v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)."""
        a, s = self._coefs(t, x0)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def flow_to_x0(self, x_t, u, t):
        """x0 from the flow velocity u = eps - x0: x_t - sigma u = (alpha + sigma) x0, so divide by alpha + sigma."""
        a, s = self._coefs(t, x_t)
        return ((x_t.float() - s * u.float()) / (a + s)).to(x_t.dtype)

    def to_x0(self, x_t, model_output, t, prediction_type: str):
        """Convert a network output of the given prediction type to an x0 estimate."""
        if prediction_type == "epsilon":
            return self.eps_to_x0(x_t, model_output, t)
        if prediction_type == "v_prediction":
            return self.v_to_x0(x_t, model_output, t)
        if prediction_type == "sample":
            return model_output
        if prediction_type == "flow":
            return self.flow_to_x0(x_t, model_output, t)
        raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")

    def target(self, x0, noise, t, prediction_type: str):
        """The regression target of a denoising network of the given prediction type."""
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        if prediction_type == "sample":
            return x0
        if prediction_type == "flow":
            return (noise.float() - x0.float()).to(x0.dtype)
        raise ValueError(f"unknown prediction type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")


class NoiseSchedule(Schedule):
    """alphas_cumprod of a discrete DDPM schedule: alpha = sqrt(ab_t), sigma = sqrt(1 - ab_t)."""

    def __init__(self, kind: str = "scaled_linear", num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.kind = kind
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = torch.cumprod(1.0 - _betas(kind, num_train_timesteps), 0).float()

    def alpha_sigma(self, t):
        ab = self.alphas_cumprod[torch.as_tensor(t, device=self.alphas_cumprod.device).long()]
        return ab.sqrt(), (1 - ab).sqrt()

    def model_timestep(self, t):
        return torch.as_tensor(t).long()

    def sampling_timesteps(self, steps: int) -> list[int]:
        return ddim_timesteps(steps, self.num_train_timesteps)


def shift_sigmas(u, shift: float):
    """SD3's timestep shift (Esser et al. 2024, eq. 23): s = shift u / (1 + (shift - 1) u); shift 1 is none.
    FLUX's resolution-dependent shift is the same map with shift = exp(mu)."""
    return shift * u / (1 + (shift - 1) * u)


class FlowSchedule(Schedule):
    """Rectified flow: x_t = (1 - s) x0 + s eps, s = shift_sigmas((t + 1) / T); networks take s * T."""

    kind = "flow"
    timestep_dtype = torch.float32

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"the flow timestep shift must be a positive number, got {shift!r}")
        self.shift = float(shift)
        self.num_train_timesteps = num_train_timesteps

    def sigma(self, t) -> torch.Tensor:
        u = (torch.as_tensor(t, dtype=torch.float64) + 1) / self.num_train_timesteps
        return shift_sigmas(u, self.shift).float()

    def alpha_sigma(self, t):
        s = self.sigma(t)
        return 1 - s, s

    def model_timestep(self, t):
        return self.sigma(t) * self.num_train_timesteps

    def sampling_timesteps(self, steps: int) -> list[float]:
        """Unshifted sigmas linspace(1, 1/steps, steps), as FLUX's pipeline sets them (then shifted)."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        T = self.num_train_timesteps
        return [T * (1 - i / steps) - 1 for i in range(steps)]


def student_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, first: int | None = None,
                      chosen: list[int] | None = None) -> list[int]:
    """Timesteps of a few-step student: 1 -> [999]; 4 -> [999, 749, 499, 249].

    `first` overrides the single timestep of a 1-step student (SDXL's official one uses 399); `chosen` gives all
    of them (a config's student_timesteps), which must be `num_steps` timesteps of this schedule.
    """
    if num_steps < 1:
        raise ValueError(f"a student needs at least 1 step, got {num_steps}")
    if chosen is not None:
        if len(chosen) != num_steps or not all(0 <= t < num_train_timesteps for t in chosen):
            raise ValueError(f"timesteps {list(chosen)}: a {num_steps}-step student needs {num_steps} in "
                             f"0..{num_train_timesteps - 1}")
        return [int(t) for t in chosen]
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
