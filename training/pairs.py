"""Teacher pairs for DMD's regression term: starting noise z, a class label, and the teacher's deterministic
(DDIM, eta=0) sample from z, the map a 1-step student should follow (DMD, Yin et al. 2023, Sec. 3.3; DMD2 drops
it). `python -m training pairs --teacher assets/mnist/teacher --num 1000 --out runs/pairs/teacher-1000.npz`;
a distillation uses them with `regression_weight: W` and `regression_pairs: PATH`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dmd2.families import PixelFamily
from dmd2.families.base import Family
from dmd2.sampling import cycled_labels, ddim_sample

KEYS = ("noise", "labels", "target")


class PairsError(ValueError):
    """A pairs file is missing, unreadable, or does not fit the run."""


@torch.no_grad()
def make_pairs(family: Family, teacher, num: int, seed: int = 0, steps: int = 50, guidance: float = 1.0,
               batch_size: int = 250, log=None) -> dict[str, np.ndarray]:
    """`num` pairs: noise from `seed` (batch b of `batch_size` from seed + b), labels cycling the classes, and the
    teacher's `steps`-step DDIM sample from each noise at CFG `guidance`, all in the UNet's space."""
    if num < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"num, steps and batch size must be >= 1 (got {num}, {steps}, {batch_size})")
    device = next(teacher.parameters()).device
    labels = cycled_labels(num, family.num_classes)
    noise, target = [], []
    for b, start in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - start)
        z = torch.randn(family.latent_shape(n), generator=torch.Generator().manual_seed(seed + b))
        cond = family.condition(labels[start:start + n]).to(device)
        x0 = ddim_sample(family, teacher, cond, z.to(device), steps=steps, guidance=guidance)
        noise.append(z.numpy())
        target.append(x0.float().cpu().numpy())
        if log is not None:
            log(f"{start + n}/{num} pairs")
    return {"noise": np.concatenate(noise).astype(np.float32), "labels": labels.astype(np.int64),
            "target": np.concatenate(target).astype(np.float32)}


def save_pairs(path: str | Path, pairs: dict[str, np.ndarray], meta: dict) -> None:
    """Write the pairs and their provenance (`meta`: teacher, steps, guidance, seed, command) to one .npz; a file
    already there is never overwritten, and a half-written one never appears under the final name."""
    path = Path(path)
    if path.suffix != ".npz":
        raise PairsError(f"pairs file {path}: must end in .npz")
    if path.exists():
        raise PairsError(f"pairs file {path} already exists; choose another --out or delete it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.npz")
    np.savez(partial, **pairs, meta=np.array(json.dumps(meta)))
    partial.replace(path)


def load_pairs(path: str | Path, family: Family) -> tuple[dict[str, torch.Tensor], dict]:
    """The pairs of a file written by `save_pairs` as tensors, and its meta; a PairsError names what is wrong
    (no file, not an .npz, an array missing, shapes that do not fit `family`, labels out of range, NaN)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PairsError(f"regression pairs {path}: no such file (make one with `python -m training pairs`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile, pickle and value errors of a damaged or foreign file
        raise PairsError(f"regression pairs {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise PairsError(f"regression pairs {path}: missing array(s) {', '.join(missing)} (has {', '.join(arrays)})")
    noise, labels, target = (arrays[k] for k in KEYS)
    n = len(labels)
    shape = family.latent_shape(n)
    if n == 0 or labels.ndim != 1 or noise.shape != shape or target.shape != shape:
        raise PairsError(f"regression pairs {path}: noise {noise.shape}, labels {labels.shape}, target {target.shape} "
                         f"do not fit this teacher, which needs {shape} and ({n},)")
    if labels.min() < 0 or labels.max() >= family.num_classes:
        raise PairsError(f"regression pairs {path}: labels must be in 0..{family.num_classes - 1}")
    if not (np.isfinite(noise).all() and np.isfinite(target).all()):
        raise PairsError(f"regression pairs {path}: noise or target holds NaN or inf")
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    tensors = {"noise": torch.from_numpy(noise).float(), "labels": torch.from_numpy(labels).long(),
               "target": torch.from_numpy(target).float()}
    return tensors, meta


def main(argv: list[str] | None = None) -> None:
    from dmd2.cli import UsageError, invocation

    p = argparse.ArgumentParser(prog="python -m training pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="assets/mnist/teacher", help="the teacher's folder (a pixel UNet)")
    p.add_argument("--num", type=int, default=1000, help="number of pairs")
    p.add_argument("--steps", type=int, default=50, help="the teacher's DDIM steps")
    p.add_argument("--guidance", type=float, default=1.0, help="the teacher's CFG scale (the run's real_guidance)")
    # Evaluations draw batch b's noise from seed + b for small seeds (evaluate: 0, 1); pairs made from the same
    # noise would teach the student the teacher's answer on the very noise it is scored on.
    p.add_argument("--seed", type=int, default=100_000, help="noise seed (batch b: seed + b); keep it far from "
                   "the seeds evaluations use")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", required=True, help="the .npz to write (never overwritten)")
    args = p.parse_args(argv)
    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        raise UsageError("--num, --steps and --batch-size must be >= 1")
    if Path(args.out).exists():  # before the minutes of sampling, not after
        raise PairsError(f"pairs file {args.out} already exists; choose another --out or delete it first")
    family, teacher = PixelFamily.for_training(args.teacher)
    teacher.eval().requires_grad_(False)
    start = time.perf_counter()
    pairs = make_pairs(family, teacher, args.num, seed=args.seed, steps=args.steps, guidance=args.guidance,
                       batch_size=args.batch_size, log=lambda s: print(s, file=sys.stderr, flush=True))
    meta = dict(teacher=str(args.teacher), steps=args.steps, guidance=args.guidance, seed=args.seed, num=args.num,
                seconds=round(time.perf_counter() - start, 1), command=invocation())
    save_pairs(args.out, pairs, meta)
    print(f"wrote {args.num} pairs to {args.out} ({meta['seconds']} s)")
