"""Teacher pairs for DMD's regression term: starting noise z, a class label, and the teacher's deterministic
(DDIM, eta=0) sample from z, the map a 1-step student should follow (DMD, Yin et al. 2023, Sec. 3.3; DMD2 drops
it). `python -m training pairs --teacher assets/mnist/teacher --num 1000 --out runs/pairs/teacher-1000.npz`;
a distillation uses them with `regression_weight: W` and `regression_pairs: PATH`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dmd2.families import PixelFamily
from dmd2.families.base import Family
from dmd2.sampling import cycled_labels, ddim_sample, initial_noise

KEYS = ("noise", "labels", "target")


class PairsError(ValueError):
    """A pairs file is missing, unreadable, or does not fit the run."""


@dataclass
class Pairs:
    """Loaded pairs: noise, labels and the teacher's samples as tensors; the file's meta; a digest of the arrays
    (a resumed run must see the same pairs)."""
    noise: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor
    meta: dict
    digest: str

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Pairs":
        """The same pairs with their tensors on `device` (moved once, not at every generator step)."""
        return Pairs(self.noise.to(device), self.labels.to(device), self.target.to(device), self.meta, self.digest)


def teacher_fingerprint(unet: torch.nn.Module) -> str:
    """A short sha256 of a network's weights (names, shapes, fp32 values): which teacher a pairs file came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def make_pairs(family: Family, teacher, num: int, seed: int = 0, steps: int = 50, guidance: float = 1.0,
               batch_size: int = 250, log=None) -> dict[str, np.ndarray]:
    """`num` pairs: noise from `seed` (batch b of `batch_size` from seed + b, as `initial_noise`), labels cycling the
    classes, and the teacher's `steps`-step DDIM sample from each noise at CFG `guidance`, in the UNet's space."""
    if num < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"num, steps and batch size must be >= 1 (got {num}, {steps}, {batch_size})")
    device = next(teacher.parameters()).device
    labels = cycled_labels(num, family.num_classes)
    noise, target = [], []
    for b, start in enumerate(range(0, num, batch_size)):
        n = min(batch_size, num - start)
        z = initial_noise(family, n, seed + b)
        cond = family.condition(labels[start:start + n]).to(device)
        x0 = ddim_sample(family, teacher, cond, z.to(device), steps=steps, guidance=guidance)
        noise.append(z.numpy())
        target.append(x0.float().cpu().numpy())
        if log is not None:
            log(f"{start + n}/{num} pairs")
    return {"noise": np.concatenate(noise).astype(np.float32), "labels": labels.astype(np.int64),
            "target": np.concatenate(target).astype(np.float32)}


def check_out(path: str | Path) -> Path:
    """The output path of a pairs file, refused before any sampling when it is no .npz or already exists."""
    path = Path(path)
    if path.suffix != ".npz":
        raise PairsError(f"pairs file {path}: must end in .npz")
    if path.exists():
        raise PairsError(f"pairs file {path} already exists; choose another --out or delete it first")
    return path


def save_pairs(path: str | Path, pairs: dict[str, np.ndarray], meta: dict) -> None:
    """Write the pairs and their provenance (`meta`: teacher fingerprint, steps, guidance, seed, command) to one
    .npz; a file already there is never overwritten, and a half-written one never appears under the final name."""
    path = check_out(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.npz")
    np.savez(partial, **pairs, meta=np.array(json.dumps(meta)))
    partial.replace(path)


def load_pairs(path: str | Path, family: Family, teacher: torch.nn.Module | None = None,
               guidance: float | None = None) -> Pairs:
    """The pairs of a file written by `save_pairs`; a PairsError names what is wrong: no file, not an .npz, an
    array missing, shapes that do not fit `family`, labels that are not class indices, NaN, no meta, and (when
    given) another `teacher` or another `guidance` than the file was made with."""
    path = Path(path).expanduser()
    where = f"regression pairs {path}"
    if not path.is_file():
        raise PairsError(f"{where}: no such file (make one with `python -m training pairs`)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # zipfile, pickle and value errors of a damaged or foreign file
        raise PairsError(f"{where}: not a readable .npz ({type(e).__name__}: {e})") from None
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise PairsError(f"{where}: missing array(s) {', '.join(missing)} (has {', '.join(arrays) or 'none'})")
    noise, labels, target = (arrays[k] for k in KEYS)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise PairsError(f"{where}: labels must be a non-empty list of integers, got {labels.dtype} {labels.shape}")
    shape = family.latent_shape(len(labels))
    if noise.shape != shape or target.shape != shape:
        raise PairsError(f"{where}: noise {noise.shape} and target {target.shape} do not fit this teacher, which "
                         f"needs {shape} for {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= family.num_classes:
        raise PairsError(f"{where}: labels must be in 0..{family.num_classes - 1}")
    if not (np.isfinite(noise).all() and np.isfinite(target).all()):
        raise PairsError(f"{where}: noise or target holds NaN or inf")
    try:
        meta = json.loads(str(arrays["meta"]))
    except (KeyError, ValueError):
        meta = None
    if not isinstance(meta, dict) or "guidance" not in meta or "teacher_fingerprint" not in meta:
        raise PairsError(f"{where}: no readable meta (teacher fingerprint and guidance), so what made it is unknown; "
                         f"make the file with `python -m training pairs`")
    if teacher is not None and meta["teacher_fingerprint"] != teacher_fingerprint(teacher):
        raise PairsError(f"{where}: made with another teacher ({meta.get('teacher', '?')}, fingerprint "
                         f"{meta['teacher_fingerprint']}) than this run's; make pairs with this run's teacher")
    if guidance is not None and float(meta["guidance"]) != float(guidance):
        raise PairsError(f"{where}: made at guidance {meta['guidance']}, but real_guidance is {guidance}; make pairs "
                         f"at --guidance {guidance} or set real_guidance to match")
    digest = hashlib.sha256(b"".join(a.tobytes() for a in (noise, labels, target))).hexdigest()[:16]
    return Pairs(torch.from_numpy(noise).float(), torch.from_numpy(labels).long(), torch.from_numpy(target).float(),
                 meta, digest)


def main(argv: list[str] | None = None) -> None:
    from dmd2.cli import UsageError, invocation

    p = argparse.ArgumentParser(prog="python -m training pairs", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="assets/mnist/teacher", help="the teacher's folder (a pixel UNet)")
    p.add_argument("--num", type=int, default=1000, help="number of pairs")
    p.add_argument("--steps", type=int, default=50, help="the teacher's DDIM steps")
    p.add_argument("--guidance", type=float, default=1.0, help="the teacher's CFG scale (the run's real_guidance)")
    # Evaluations draw batch b's noise from seed + b: `evaluate --seed k` from k (sets 0 and 1 here), the quick
    # evaluation during training from 10,000 + i (i < eval_num). Pairs made from the same noise would teach the
    # student the teacher's answer on the very noise it is scored on.
    p.add_argument("--seed", type=int, default=100_000, help="noise seed (batch b: seed + b); keep it far from "
                   "the seeds evaluations use")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", required=True, help="the .npz to write (never overwritten)")
    args = p.parse_args(argv)
    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        raise UsageError("--num, --steps and --batch-size must be >= 1")
    check_out(args.out)  # before the minutes of sampling, not after
    family, teacher = PixelFamily.for_training(args.teacher)
    teacher.eval().requires_grad_(False)
    start = time.perf_counter()
    pairs = make_pairs(family, teacher, args.num, seed=args.seed, steps=args.steps, guidance=args.guidance,
                       batch_size=args.batch_size, log=lambda s: print(s, file=sys.stderr, flush=True))
    meta = dict(teacher=str(args.teacher), teacher_fingerprint=teacher_fingerprint(teacher), steps=args.steps,
                guidance=args.guidance, seed=args.seed, num=args.num,
                seconds=round(time.perf_counter() - start, 1), command=invocation())
    save_pairs(args.out, pairs, meta)
    print(f"wrote {args.num} pairs to {args.out} ({meta['seconds']} s)")
