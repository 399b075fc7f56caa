"""Guidance-conditioned students: the guidance scale w as a network input instead of a CFG pass.

A DMD2 student bakes in the real score's CFG scale. A guidance-conditioned student takes w as an input
(a sinusoidal embedding of w, through a zero-initialised projection added to the time embedding, as
diffusers' `time_cond_proj_dim`), is trained with a real score at a w drawn per sample from a range, and
samples at any w in that range with one network evaluation per step.
"""

from __future__ import annotations

import math

import torch

DEFAULT_EMBED_DIM = 256          # the width of the w embedding (diffusers' LCM students use 256 too)
SAMPLINGS = ("uniform", "log_uniform")


def guidance_embedding(w: torch.Tensor, dim: int = DEFAULT_EMBED_DIM) -> torch.Tensor:
    """The embedding diffusers' pipelines pass as `timestep_cond`: sin/cos of 1000 (w - 1) at `dim` frequencies.

    Same values as `get_guidance_scale_embedding(guidance_scale - 1, dim)` in diffusers' SD/SDXL pipelines,
    so an exported SD student runs in plain diffusers with `guidance_scale=w`.
    """
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = ((w - 1) * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def sample_guidance(n: int, low: float, high: float, sampling: str, gen: torch.Generator) -> torch.Tensor:
    """n guidance scales in [low, high]: uniform in w, or uniform in log w ("log_uniform": more draws near low)."""
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    if sampling == "uniform":
        w = low + (high - low) * u
    elif sampling == "log_uniform":
        w = torch.exp(math.log(low) + (math.log(high) - math.log(low)) * u)
    else:
        raise ValueError(f"guidance sampling {sampling!r}: expected one of {', '.join(SAMPLINGS)}")
    return w.float()


def check_guidance(w, guidance_range, model: str = "this student") -> float:
    """w as a float, or ValueError when it is not a number inside the student's guidance range."""
    low, high = guidance_range
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"guidance {w!r}: must be a number in [{low:g}, {high:g}]") from None
    if not (low - 1e-9 <= w <= high + 1e-9):
        raise ValueError(f"guidance {w:g} is outside {model}'s range [{low:g}, {high:g}]: it was trained on "
                         f"guidance scales in that range only")
    return w


ENTRY_SEPARATOR = "@w="


def entry_name(model: str, w: float) -> str:
    """The name a guidance-conditioned student at w goes by in battles and votes: `<model>@w=<w>`, so the
    Leaderboard rates each w it was voted at on its own."""
    return f"{model}{ENTRY_SEPARATOR}{float(w):g}"


def parse_entry(name: str) -> tuple[str, float | None]:
    """(model, w) from `entry_name`'s form; (name, None) for any other name."""
    model, sep, w = str(name).rpartition(ENTRY_SEPARATOR)
    if not sep:
        return str(name), None
    try:
        return model, float(w)
    except ValueError:
        return str(name), None
