"""A tiny random guidance-conditioned pixel student whose w visibly changes its samples, for the app and CLI tests."""

from __future__ import annotations

import torch

from conftest import tiny_pixel_unet
from dmd2.families.pixel import PixelFamily

GUIDED_RANGE = [1.0, 3.0]


def make_tiny_guided_student(folder, seed: int = 0, guidance_range=GUIDED_RANGE, guidance_default: float = 1.0) -> str:
    """Save a 1-step guided student of `tiny_pixel_unet(seed)` to `folder` (w in `guidance_range`); returns its path."""
    family = PixelFamily()
    guided = family.guidance_conditioned(tiny_pixel_unet(seed), 16)
    # guidance_conditioned starts the w projection at zero (w changes nothing): give it weights so w matters.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        weight = guided.time_embedding.cond_proj.weight
        weight.copy_(torch.randn(weight.shape, generator=gen) * 2.0)
    family.save_student(guided, folder, timesteps=[999], guidance_range=list(guidance_range),
                        guidance_default=guidance_default)
    return str(folder)
