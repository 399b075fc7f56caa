"""Generator inputs for DMD2: pure noise (1 step), backward simulation, or noised real images (ablation)."""

from __future__ import annotations

from typing import Any

import torch

from dmd2.families.base import Family
from dmd2.sampling import fresh_fraction, renoise_move


def randn(shape, gen: torch.Generator, device) -> torch.Tensor:
    """Gaussian noise from an explicit generator (so every draw is reproducible and resumable)."""
    return torch.randn(shape, generator=gen).to(device)


@torch.no_grad()
def backward_simulate(family: Family, generator, cond: Any, timesteps: list[int], k: int,
                      noise: torch.Tensor, gen: torch.Generator, guidance_input=None,
                      renoise: str = "fresh") -> torch.Tensor:
    """Run the student's own inference for its first k steps from `noise`, moving to timesteps[k].

    This is DMD2's backward simulation (Sec. 4.5): the training input at step k comes from the
    generator's trajectory, as at inference, not from noised real images. Each move is the sampler's
    (`dmd2.sampling.renoise_move`): fresh noise from `gen` ("fresh"), DDIM's move ("ddim", no draw), or a
    fraction of fresh noise between them.
    """
    fraction = fresh_fraction(renoise)
    x = noise
    for i in range(k):
        x0 = family.denoise(generator, x, timesteps[i], cond, guidance_input=guidance_input)
        # fresh re-noising takes x0 as the generator made it (bf16 under autocast), as it always has; the moves
        # that keep noise from the state take it in fp32
        x = renoise_move(family.schedule, x, x0 if fraction == 1 else x0.float(), timesteps[i], timesteps[i + 1],
                         fraction, lambda: randn(x0.shape, gen, x0.device))
    return x


def generator_input(family: Family, generator, cond: Any, n: int, timesteps: list[int],
                    gen: torch.Generator, device, backward_simulation: bool = True,
                    real_x0: torch.Tensor | None = None,
                    step_weights: list[float] | None = None,
                    guidance_input: torch.Tensor | None = None,
                    renoise: str = "fresh") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) for one generator training forward: k ~ U{0..N-1}, then the input at timesteps[k].

    With one step this is pure noise at timesteps[0]. Without backward simulation the input is a
    real image noised to timesteps[k] (the ablation of the paper's Table 4). `step_weights`
    (one per step) draws k in proportion to them instead of uniformly. `guidance_input`: the per-sample
    w of a guidance-conditioned generator, which its simulated steps use too; `renoise`: how they move.
    """
    if step_weights is None:
        k = int(torch.randint(len(timesteps), (1,), generator=gen))
    else:
        k = int(torch.multinomial(torch.tensor(step_weights, dtype=torch.float64), 1, generator=gen))
    noise = randn(family.latent_shape(n), gen, device)
    t = torch.full((n,), timesteps[k], dtype=torch.long, device=device)
    if k == 0:
        # The first step always starts from pure noise: at t=999 the real image is (almost) gone.
        return noise, t
    if backward_simulation:
        return backward_simulate(family, generator, cond, timesteps, k, noise, gen, guidance_input, renoise), t
    if real_x0 is None:
        raise ValueError("backward simulation is off, so real images are needed as generator inputs")
    return family.schedule.add_noise(real_x0, randn(real_x0.shape, gen, device), t), t
