"""Sampling speed of the embedded models, printed as images/s and ratios measured in one run.

    python benchmarks/sampling.py [--batches 1,64] [--repeats 2]

Rows: the teacher at its default guidance (1.0: no CFG, NFE 50), the teacher with CFG (guidance 2.0:
conditional and unconditional in one batched pass per step, NFE 100) and every available student, at
each batch size, in fp32 and with bf16 autocast. Ratios: teacher time over student time at the same
batch and precision (the NFE limits: 50/NFE without CFG, 100/NFE with it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dmd2 import registry


def images_per_second(model, batch: int, autocast: bool, repeats: int, guidance: float | None = None) -> float:
    """Best of `repeats` timed runs after one warm-up (the first call pays one-off costs)."""
    labels = np.arange(batch) % model.num_classes
    model.generate(labels, seed=0, autocast=autocast, guidance=guidance)
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        model.generate(labels, seed=r + 1, autocast=autocast, guidance=guidance)
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    names = registry.available("pixel")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; models: {', '.join(names)}")
    teacher, cfg_teacher = "mnist-teacher", "mnist-teacher CFG 2.0"
    rows = [(n, None) for n in names] + [(cfg_teacher, 2.0)]
    rates, nfes = {}, {}
    print(f"{'model':<24}{'NFE':>5}{'batch':>7}{'precision':>11}{'images/s':>11}")
    for label, guidance in rows:
        model = registry.load(teacher if guidance else label)
        nfes[label] = model.generate([0], seed=0, steps=None, guidance=guidance).nfe
        for batch in batches:
            for autocast in (False, True):
                ips = images_per_second(model, batch, autocast, a.repeats, guidance)
                rates[label, batch, autocast] = ips
                print(f"{label:<24}{nfes[label]:>5}{batch:>7}{'bf16' if autocast else 'fp32':>11}{ips:>11.2f}")
    print()
    for batch in batches:
        print(f"batch {batch}: bf16 speed-up of the teacher {rates[teacher, batch, True] / rates[teacher, batch, False]:.2f}x")
        for name in names:
            if name == teacher:
                continue
            for autocast in (False, True):
                for ref in (teacher, cfg_teacher):
                    ratio = rates[name, batch, autocast] / rates[ref, batch, autocast]
                    print(f"batch {batch} {'bf16' if autocast else 'fp32'}: {name} is {ratio:.1f}x faster than "
                          f"{ref} (NFE limit {nfes[ref] / nfes[name]:.0f}x)")


if __name__ == "__main__":
    main()
