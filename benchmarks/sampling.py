"""Sampling speed of the embedded models, printed as images/s and ratios measured in one run.

    python benchmarks/sampling.py [--batches 1,64] [--repeats 2]

Rows: the teacher (DDIM 50 steps with CFG) and every available student, at each batch size, in
fp32 and with bf16 autocast. Ratios: teacher time over student time at the same batch and precision.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dmd2 import registry


def images_per_second(model, batch: int, autocast: bool, repeats: int) -> float:
    """Best of `repeats` timed runs after one warm-up (the first call pays one-off costs)."""
    labels = np.arange(batch) % model.num_classes
    model.generate(labels, seed=0, autocast=autocast)
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        model.generate(labels, seed=r + 1, autocast=autocast)
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    names = registry.available()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; models: {', '.join(names)}")
    rates = {}
    print(f"{'model':<20}{'NFE':>5}{'batch':>7}{'precision':>11}{'images/s':>11}")
    for name in names:
        model = registry.load(name)
        nfe = model.generate([0], seed=0, steps=None).nfe
        for batch in batches:
            for autocast in (False, True):
                ips = images_per_second(model, batch, autocast, a.repeats)
                rates[name, batch, autocast] = ips
                print(f"{name:<20}{nfe:>5}{batch:>7}{'bf16' if autocast else 'fp32':>11}{ips:>11.2f}")
    teacher = "mnist-teacher"
    print()
    for batch in batches:
        print(f"batch {batch}: bf16 speed-up of the teacher {rates[teacher, batch, True] / rates[teacher, batch, False]:.2f}x")
        for name in names:
            if name == teacher:
                continue
            for autocast in (False, True):
                ratio = rates[name, batch, autocast] / rates[teacher, batch, autocast]
                print(f"batch {batch} {'bf16' if autocast else 'fp32'}: {name} is {ratio:.1f}x faster than the teacher")


if __name__ == "__main__":
    main()
