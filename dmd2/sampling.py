"""Samplers: the teacher's DDIM (Euler for a flow teacher) with classifier-free guidance, and the few-step student sampler."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from dmd2.families.base import Family


def bf16_is_native(device) -> bool:
    """Does `device` run bf16 matrix work in hardware? A GPU that supports bf16, or a CPU with AVX512-BF16 or AMX
    (oneDNN's own check). Without them bf16 autocast on a CPU is emulated: on an AVX2-only 2-core CPU a
    `configs/mnist-1step.yaml` step took 24.6 s in bf16 against 1.4 s in fp32 (docs/experiments.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:                                   # private, so guarded
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def initial_noise(family: Family, n: int, seed: int, device="cpu") -> torch.Tensor:
    """The starting noise of a sample batch: the same seed gives the same noise for every model."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(family.latent_shape(n), generator=gen).to(device)


def renoise_seed(seed: int) -> int:
    """The seed of a student's re-noising generator for a request seeded `seed`: a different stream from the
    starting noise's (`initial_noise(..., seed)`), so a multi-step student's first fresh noise is not its
    starting noise again; well mixed, so it does not collide with the starting seeds of other requests."""
    return int(np.random.SeedSequence([int(seed), 0x5EED]).generate_state(1, np.uint64)[0] >> 1)


RENOISE = ("fresh", "ddim")   # how a multi-step student moves from one step to the next (`student_sample`)


def check_renoise(renoise: str | float) -> str | float:
    """`renoise` in its canonical form: one of RENOISE, or a number in [0, 1] (the fraction of fresh noise: 1 is
    "fresh", 0 is "ddim", which those numbers become); else a ValueError naming the choices."""
    if isinstance(renoise, (int, float)) and not isinstance(renoise, bool):
        if not 0 <= renoise <= 1:   # NaN fails too
            raise ValueError(f"renoise as a number is the fraction of fresh noise, in [0, 1], got {renoise}")
        return "ddim" if renoise == 0 else "fresh" if renoise == 1 else float(renoise)
    if renoise not in RENOISE:
        raise ValueError(f"renoise must be one of {', '.join(RENOISE)} or a number in [0, 1], got {renoise!r}")
    return renoise


def fresh_fraction(renoise: str | float) -> float:
    """The fraction of the next noise level that is fresh noise: 1 for "fresh", 0 for "ddim", else the number."""
    renoise = check_renoise(renoise)
    return {"fresh": 1.0, "ddim": 0.0}.get(renoise, renoise) if isinstance(renoise, str) else renoise


def renoise_move(schedule, x: torch.Tensor, x0: torch.Tensor, t, t_next, fraction: float,
                 fresh: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A student's move from x_t to x_{t_next} given its x0 estimate: x_next = alpha_next x0 + sigma_next n with
    n = sqrt(1 - f^2) eps + f z, eps the noise x_t implies given x0 and z fresh noise (drawn by `fresh()` only where
    f > 0). f = 1: DMD2's fresh re-noising; f = 0: DDIM's deterministic move (`ddim_move`); between them DDIM's
    eta-style mix, f = sigma / sigma_next in DDIM's notation."""
    if fraction == 0:
        return ddim_move(schedule, x, x0, t, t_next)
    z = fresh()
    if fraction == 1:
        return schedule.add_noise(x0, z, torch.tensor([t_next]))
    eps = schedule.x0_to_eps(x, x0, torch.tensor([t]))
    return schedule.add_noise(x0, math.sqrt(1 - fraction ** 2) * eps + fraction * z, torch.tensor([t_next]))


def ddim_move(schedule, x: torch.Tensor, x0: torch.Tensor, t, t_next) -> torch.Tensor:
    """One deterministic DDIM move from x_t to x_{t_next}, given the network's x0 estimate at t."""
    eps = schedule.x0_to_eps(x, x0, torch.tensor([t]))
    a_next, s_next = schedule.alpha_sigma(torch.tensor(t_next))
    return a_next * x0 + s_next * eps


def _ddim_walk(family: Family, unet, cond: Any, x: torch.Tensor, ts: list, land, guidance: float | None,
               autocast: bool, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DDIM over the timesteps `ts` from x at ts[0]: the last move lands on timestep `land`, or with `land` None the
    result is the last x0 estimate (a finished sample)."""
    guidance = family.default_guidance if guidance is None else guidance
    for i, t in enumerate(ts):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            x0 = family.denoise(unet, x, t, cond, guidance).float()
        t_next = ts[i + 1] if i + 1 < len(ts) else land
        x = x0 if t_next is None else ddim_move(family.schedule, x, x0, t, t_next)
        if callback is not None:
            callback(i + 1, len(ts))
    return x


@torch.no_grad()
def ddim_sample(family: Family, unet, cond: Any, noise: torch.Tensor, steps: int = 50,
                guidance: float | None = None, autocast: bool = False,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta=0) from `noise` over the schedule's `steps` sampling timesteps; returns x0 in
    UNet space. x_next = alpha_next x0 + sigma_next eps: for a flow schedule this is exactly the Euler step
    x_next = x + (s_next - s) u of diffusers' FlowMatchEulerDiscreteScheduler."""
    return _ddim_walk(family, unet, cond, noise, family.schedule.sampling_timesteps(steps), None, guidance, autocast,
                      callback)


def handover_timesteps(schedule, until, steps: int = 50) -> list:
    """The timesteps the teacher evaluates on its way from pure noise down to `until`: those of its `steps`-step
    sampling grid above `until` (the last move then lands on `until` itself)."""
    ts = [t for t in schedule.sampling_timesteps(steps) if t > until]
    if not ts:
        raise ValueError(f"no timestep of the teacher's {steps}-step grid lies above {until}: nothing to hand over")
    return ts


@torch.no_grad()
def ddim_until(family: Family, unet, cond: Any, noise: torch.Tensor, until, steps: int = 50,
               guidance: float | None = None, autocast: bool = False) -> torch.Tensor:
    """The teacher's own DDIM trajectory from `noise` (pure noise) down to timestep `until`, stopped there: x_until,
    not x0. It follows the teacher's `steps`-step grid (`handover_timesteps`), so where `until` is on that grid it is
    exactly the state `ddim_sample` passes through. A student can finish from it (`student_sample` from `until`)."""
    return _ddim_walk(family, unet, cond, noise, handover_timesteps(family.schedule, until, steps), until, guidance,
                      autocast)


@torch.no_grad()
def student_sample(family: Family, unet, cond: Any, noise: torch.Tensor, timesteps: list[int],
                   seed: int | None = None, guidance: float = 1.0, autocast: bool = False,
                   on_step: Callable[[int, int, torch.Tensor], None] | None = None,
                   guidance_input: float | torch.Tensor | None = None,
                   request_seeds: list[tuple[int, int]] | None = None, renoise: str | float = "fresh") -> torch.Tensor:
    """Few-step student: denoise at each timestep, then move to the next one.

    `renoise` "fresh" (DMD2's sampler): re-noise the x0 estimate with fresh noise, from a generator seeded by
    `seed` (default: a fixed seed), so the whole sample is a deterministic function of (noise, seed). "ddim":
    DDIM's deterministic move, x_next = alpha_next x0 + sigma_next eps, eps the noise the current state implies
    given x0 (the first move keeps about the starting noise); the sample is a function of the noise alone. A
    number f in [0, 1] mixes the two (`renoise_move`). `on_step(i, t, x0)` sees each step's x0
    estimate (i from 1), e.g. to score the intermediate images of a multi-step student.
    `guidance_input`: the guidance scale w of a guidance-conditioned student (an input, no CFG pass).
    `request_seeds`: [(seed, images), ...] when the batch joins several requests (dmd2/batching.py): each
    request's fresh noise then comes from its own seed, so it gets the images it would get alone.
    """
    fraction = fresh_fraction(renoise)
    requests = request_seeds or [(0x5EED if seed is None else seed, noise.shape[0])]
    gens = [(torch.Generator().manual_seed(int(s)), n) for s, n in requests]
    x = noise
    for i, t in enumerate(timesteps):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
            x0 = family.denoise(unet, x, t, cond, guidance, guidance_input=guidance_input).float()
        if on_step is not None:
            on_step(i + 1, t, x0)
        if i + 1 == len(timesteps):
            return x0
        x = renoise_move(family.schedule, x, x0, t, timesteps[i + 1], fraction, lambda: torch.cat(
            [torch.randn((n, *x0.shape[1:]), generator=g) for g, n in gens]).to(x0.device))
    return x


def cycled_labels(n: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., C-1, 0, 1, ...: labels spread evenly over the classes."""
    return np.arange(n, dtype=np.int64) % num_classes


SAMPLE_SET_STRIDE = 1000


def sample_set_seed(k: int) -> int:
    """The sampling seed of sample set k (`evaluate --seed`): k * 1000. `generate_many` seeds batch b with seed + b,
    so seeds 0 and 1 share all batches but one (at 5,000 samples in batches of 250, 4,750 of their images are the
    same); sets 1,000 seeds apart share none up to 250,000 samples. Set 0 is seed 0, as before."""
    if k < 0:
        raise ValueError(f"sample set must be >= 0, got {k}")
    return k * SAMPLE_SET_STRIDE


def generate_many(model, n: int, seed: int, steps=None, guidance=None, batch_size: int = 250,
                  labels: np.ndarray | None = None, autocast: bool = False, step_images: list | None = None,
                  teacher_until: int | None = None, teacher_steps: int | None = None,
                  teacher_guidance: float | None = None, renoise: str | float | None = None):
    """n samples in batches (batch b uses seed+b: seeds closer than n / batch_size share batches, so independent
    sample sets take `sample_set_seed`); returns images, labels, seconds per image.

    `step_images`: a list that receives, per student step, the x0 estimates of all n samples.
    `teacher_until` (multi-step students): the teacher's trajectory down to that timestep, then the student
    (`LoadedModel.generate`); `teacher_steps`: the teacher's grid for it, `teacher_guidance` its CFG scale.
    `renoise`: a multi-step student's move between steps (`student_sample`; default: the student's own)."""
    handover = {} if teacher_until is None else {"teacher_until": teacher_until, "teacher_steps": teacher_steps,
                                                 "teacher_guidance": teacher_guidance}
    labels = cycled_labels(n, model.num_classes) if labels is None else labels
    images, seconds, nfe, steps_seen = [], 0.0, None, []
    for b, start in enumerate(range(0, n, batch_size)):
        out = model.generate(labels[start:start + batch_size], seed=seed + b, steps=steps, guidance=guidance,
                             autocast=autocast, step_images=step_images is not None, renoise=renoise, **handover)
        images.append(out.images)
        if step_images is not None:
            steps_seen.append(out.extra["step_images"])
        seconds += out.seconds
        nfe = out.nfe
    images = np.concatenate(images) if images else np.zeros((0, 32, 32, 1), np.uint8)
    if step_images is not None and steps_seen:
        step_images.extend(np.concatenate(per_step) for per_step in zip(*steps_seen))
    return images, labels, seconds / max(n, 1), nfe
