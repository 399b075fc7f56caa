"""How well each model denoises real digits in one step: noise the real MNIST digits to t, take the
model's x0 estimate, and compare it with the clean digit (MSE, mean pixel value, share of ink pixels).

A multi-step student applies this one-step map at each of its later timesteps, so a map that thins
the strokes of real digits thins its own samples too (README, *Results*).

    python scripts/denoise_probe.py --models mnist-teacher mnist-dmd2-1step mnist-dmd2-4step --t 749 499 249
"""

from __future__ import annotations

import argparse

import torch

from dmd2 import registry
from training.data import load_mnist5k


def ink_stats(x: torch.Tensor) -> dict:
    """Mean pixel value (in [-1, 1]) and the share of pixels brighter than mid-grey (the strokes)."""
    x = x.clamp(-1, 1)
    return {"mean": float(x.mean()), "ink": float((x > 0).float().mean())}


@torch.no_grad()
def probe(models: list[str], timesteps: list[int], num: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (model, t), after a first row for the clean digits themselves."""
    images, labels = load_mnist5k()
    if not 1 <= num <= len(images):
        raise ValueError(f"--num must be in 1..{len(images)}, got {num}")
    clean = images[:num]
    rows = [{"model": "real digits", "t": 0, "mse": 0.0, **ink_stats(clean)}]
    for name in models:
        model = registry.load(name)
        family = model.family
        cond = family.condition(labels[:num].tolist())
        gen = torch.Generator().manual_seed(seed)  # the same noise for every model
        for t in timesteps:
            if not 0 <= t < family.schedule.num_train_timesteps:
                raise ValueError(f"timestep {t} is outside 0..{family.schedule.num_train_timesteps - 1}")
            noisy = family.schedule.add_noise(clean, torch.randn(clean.shape, generator=gen), torch.tensor([t]))
            x0 = family.denoise(model.unet, noisy, t, cond).float()
            rows.append({"model": name, "t": t, "mse": float(((x0.clamp(-1, 1) - clean) ** 2).mean()), **ink_stats(x0)})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mnist-teacher", "mnist-dmd2-1step", "mnist-dmd2-4step"])
    ap.add_argument("--t", nargs="+", type=int, default=[749, 499, 249])
    ap.add_argument("--num", type=int, default=1000, help="real digits to noise (of 5,000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print("| model | t | MSE to the clean digit | mean pixel | ink pixels |")
    print("|---|---|---|---|---|")
    for r in probe(args.models, args.t, args.num, args.seed):
        print(f"| {r['model']} | {r['t']} | {r['mse']:.4f} | {r['mean']:.3f} | {r['ink']:.3f} |")


if __name__ == "__main__":
    main()
