"""Sample a class student at other timesteps, or with another model's first step, and score it.

A multi-step student denoises at t=999, re-noises its x0 estimate to the next timestep with fresh noise and
denoises again. This script changes what each step is, without training, to see where a student's quality
comes from (README, *Results*): `--timesteps` after the first step (default: the student's own), and
`--first` another model for the first step (e.g. the 1-step student, then the 4-step student's later steps).
Same noise, labels and fresh-noise seeds as `python -m dmd2 evaluate`, so with neither option it gives
exactly the evaluator's samples and scores.

    python scripts/mixed_steps.py --model mnist-dmd2-4step --first mnist-dmd2-1step --timesteps 249 --seed 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from dmd2 import registry
from dmd2.images import to_uint8
from dmd2.metrics.independent import evaluate_independent
from dmd2.metrics.mnist import evaluate_images
from dmd2.sampling import cycled_labels, initial_noise, renoise_seed


@torch.no_grad()
def sample(model: str, first: str | None = None, timesteps: list[int] | None = None, num: int = 5000,
           seed: int = 0, batch_size: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """`num` images (uint8) and their labels; batch b uses seed + b, as `generate_many` does."""
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be at least 1, got {num} and {batch_size}")
    later = registry.load(model)
    start = registry.load(first) if first else later
    if later.conditioning != "class" or start.conditioning != "class":
        raise ValueError("mixed_steps samples class-conditional (pixel) models only")
    if later.spec.kind != "student" or start.spec.kind != "student":
        raise ValueError(f"{model if later.spec.kind != 'student' else first} is not a student")
    other = [m for m in (start, later) if m.renoise != "fresh"]
    if other:   # this loop re-noises with fresh noise, as DMD2's sampler does; such a student moves otherwise
        raise ValueError(f"{other[0].spec.name} moves between its steps by {other[0].renoise} (its dmd2.json), "
                         f"and mixed_steps re-noises with fresh noise: it would not sample as that student does")
    family = later.family
    if start.family.latent_shape(1) != family.latent_shape(1):
        raise ValueError(f"{first} and {model} make images of different shapes")
    ts = list(later.timesteps[1:]) if timesteps is None else [int(t) for t in timesteps]
    bad = [t for t in ts if not 0 <= t < family.schedule.num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps must be in 0..{family.schedule.num_train_timesteps - 1}, got {bad}")
    labels = cycled_labels(num, family.num_classes)
    images = []
    for b, i in enumerate(range(0, num, batch_size)):
        batch = labels[i:i + batch_size]
        cond = family.condition(batch)
        x = initial_noise(family, len(batch), seed + b)
        fresh = torch.Generator().manual_seed(renoise_seed(seed + b))  # as generate seeds its fresh noise
        x0 = start.family.denoise(start.unet, x, start.timesteps[0], cond, 1.0).float()
        for t in ts:
            x = family.schedule.add_noise(x0, torch.randn(x0.shape, generator=fresh), torch.tensor([t]))
            x0 = family.denoise(later.unet, x, t, cond, 1.0).float()
        images.append(to_uint8(family.decode(x0)))
    return np.concatenate(images), labels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the student whose later steps are used")
    p.add_argument("--first", help="the student whose first step is used (default: --model)")
    p.add_argument("--timesteps", type=int, nargs="*",
                   help="timesteps after the first step (default: the student's own; none: the first step alone)")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the scores to this file")
    a = p.parse_args(argv)
    images, labels = sample(a.model, a.first, a.timesteps, a.num, a.seed)
    scores = {**evaluate_images(images, labels), **evaluate_independent(images)}  # every measure of `evaluate`
    row = {"model": a.model, "first": a.first or a.model, "timesteps": a.timesteps, "num": a.num, "seed": a.seed,
           "nfe": 1 + (len(registry.load(a.model).timesteps) - 1 if a.timesteps is None else len(a.timesteps)),
           **{k: v for k, v in scores.items() if not isinstance(v, (list, dict))}}
    print(json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
