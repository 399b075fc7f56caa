"""Command line: `python -m dmd2 sample ...` and `python -m dmd2 evaluate ...`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from dmd2.cli import UsageError, run_cli
from dmd2.images import save_grid


def _non_negative(name):
    def parse(s):
        v = int(s)
        if v < 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {v}")
        return v
    return parse


def _positive(name):
    def parse(s):
        v = int(s)
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {v}")
        return v
    return parse


def cycled_labels(n: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., C-1, 0, 1, ...: labels spread evenly over the classes."""
    return np.arange(n, dtype=np.int64) % num_classes


def generate_many(model, n: int, seed: int, steps=None, guidance=None, batch_size: int = 250,
                  labels: np.ndarray | None = None, autocast: bool = False):
    """n samples in batches (batch b uses seed+b); returns images, labels, seconds per image."""
    labels = cycled_labels(n, model.num_classes) if labels is None else labels
    images, seconds, nfe = [], 0.0, None
    for b, start in enumerate(range(0, n, batch_size)):
        out = model.generate(labels[start:start + batch_size], seed=seed + b, steps=steps, guidance=guidance,
                             autocast=autocast)
        images.append(out.images)
        seconds += out.seconds
        nfe = out.nfe
    images = np.concatenate(images) if images else np.zeros((0, 32, 32, 1), np.uint8)
    return images, labels, seconds / max(n, 1), nfe


def _check_writable(path: str) -> Path:
    """Fail before any sampling if the output file cannot be created."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"output path {out} is a directory")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write output file {out}: {e.strerror}") from None
    if not existed:
        out.unlink()
    return out


def cmd_sample(a) -> None:
    from dmd2 import registry

    out = _check_writable(a.out)
    model = registry.load(a.model)
    images, labels, _, _ = generate_many(model, a.num, a.seed, a.steps, a.guidance, labels=_labels(a, model),
                                         autocast=a.bf16)
    np.savez(out, images=images, labels=labels)
    print(f"wrote {len(images)} images from {a.model} to {out}")


def _labels(a, model):
    if a.label is None:
        return None
    if not 0 <= a.label < model.num_classes:
        raise UsageError(f"--label must be in 0..{model.num_classes - 1}, got {a.label}")
    return np.full(a.num, a.label, dtype=np.int64)


def cmd_evaluate(a) -> None:
    from dmd2 import registry
    from dmd2.metrics.mnist import evaluate_images

    out = _check_writable(a.json) if a.json else None
    if a.num < 2:
        raise UsageError(f"--num must be at least 2 to estimate FID, got {a.num}")
    model = registry.load(a.model)
    images, labels, sec_per_image, nfe = generate_many(model, a.num, a.seed, a.steps, a.guidance, autocast=a.bf16)
    result = {"model": a.model, "num": a.num, "seed": a.seed, "nfe": nfe, "ms_per_image": 1000 * sec_per_image,
              "precision": "bf16" if a.bf16 else "fp32"}
    result.update(evaluate_images(images, labels))
    if a.steps is not None:
        result["steps"] = a.steps
    if a.guidance is not None:
        result["guidance"] = a.guidance
    for k, v in result.items():
        print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n")


def cmd_grid(a) -> None:
    from dmd2 import registry

    out = _check_writable(a.out)
    model = registry.load(a.model)
    images, _, _, nfe = generate_many(model, a.rows * model.num_classes, a.seed, a.steps, a.guidance)
    save_grid(images, out, cols=model.num_classes)
    print(f"wrote a {a.rows} x {model.num_classes} grid from {a.model} (NFE {nfe}) to {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dmd2", description="Sample and evaluate DMD2 teachers and students.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="write N samples to an .npz (images uint8 NxHxWxC, labels int64)")
    s.add_argument("--model", default="mnist-teacher")
    s.add_argument("--num", type=_non_negative("--num"), default=64)
    s.add_argument("--seed", type=_non_negative("--seed"), default=0)
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=_positive("--steps"), default=None, help="teacher DDIM steps (default 50)")
    s.add_argument("--guidance", type=float, default=None, help="teacher CFG scale (default: the model's)")
    s.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (default fp32)")
    s.add_argument("--label", type=int, default=None, help="one class for every sample (default: cycle 0..9)")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("evaluate", help="FID, class alignment, diversity, NFE and ms/image")
    e.add_argument("--model", default="mnist-teacher")
    e.add_argument("--num", type=_non_negative("--num"), default=5000)
    e.add_argument("--seed", type=_non_negative("--seed"), default=0)
    e.add_argument("--steps", type=_positive("--steps"), default=None)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (default fp32)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(fn=cmd_evaluate)
    g = sub.add_parser("grid", help="a PNG grid: one column per class, --rows samples each")
    g.add_argument("--model", default="mnist-teacher")
    g.add_argument("--rows", type=_positive("--rows"), default=10)
    g.add_argument("--seed", type=_non_negative("--seed"), default=0)
    g.add_argument("--steps", type=_positive("--steps"), default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--out", required=True)
    g.set_defaults(fn=cmd_grid)
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    run_cli(lambda: a.fn(a))


if __name__ == "__main__":
    main(sys.argv[1:])
