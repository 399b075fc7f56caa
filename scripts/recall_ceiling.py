"""How much recall do fresh draws of the data get? Each model's k-NN measures against one half of the 5,000 real
digits, beside the other half's, over several random splits; and how close each model's samples come to
copying a training digit.

    python scripts/recall_ceiling.py teacher=runs/ceiling/teacher-set0.npz 1-step=runs/ceiling/1step-set0.npz \
        [--splits 5] [--json results/recall-ceiling.json] [--table results/recall-ceiling.md]

Samples come from `python -m dmd2 sample --model M --num 2500 --seed 0 --out F.npz` (the first 2,500 images of
`evaluate`'s sample set 0). The 5,000 real digits are both the teacher's training set and the reference of every
measure of `evaluate`, so a model that reproduced its training digits would score a recall no fresh draw of the
data distribution reaches. Here, per split s (numpy seed s), the real digits are shuffled into halves A and B;
B plays "held-out real" (draws of the data distribution, as many as A) and each model's first len(B) samples are
scored against A like B is: precision and recall (k = 3), density and coverage (k = 5), in the classifier's and
the autoencoder's features (the spaces of `evaluate`). A model's recall above B's is recall that fresh digits
do not have. Copying: each scored sample's pixel distance (images in [0, 1]) to its nearest training digit, beside
each real digit's distance to its nearest other one; their medians, and the fraction of samples closer than
the real digits' 1st percentile (about 0.01 for draws like the real ones, 1 for a model that copies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import zipfile
from pathlib import Path

import numpy as np

from dmd2.metrics.independent import default_autoencoder, embed, neighbour_measures
from dmd2.metrics.mnist import _to_tensor, default_classifier, real_digits
from dmd2.metrics.neighbours import knn_radii, nearest_distances

HELD_OUT = "held-out real"  # the k-NN rows: half B; the copying rows: every real digit against the others
MEASURES = ("precision", "recall", "density", "coverage")
COPY_PERCENTILE = 1  # "closer than the real digits' 1st percentile of nearest-other-digit distances"


def load_samples(spec: str) -> tuple[str, np.ndarray]:
    """NAME=FILE.npz (from `python -m dmd2 sample`) -> (name, uint8 images); ValueError naming what is wrong."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"expected NAME=FILE.npz, got {spec!r}")
    if name == HELD_OUT:
        raise ValueError(f"{name!r} is the name of the held-out real half; call the model something else")
    unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile)  # missing, truncated, neither .npy nor .npz
    try:
        data = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise ValueError(f"{path}: cannot read samples ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not an .npz of samples (write one with `python -m dmd2 sample --out`)")
    with data:
        if "images" not in data:
            raise ValueError(f"{path}: no 'images' array (write it with `python -m dmd2 sample --out`)")
        try:
            images = data["images"]
        except unreadable as e:
            raise ValueError(f"{path}: cannot read samples ({e})") from None
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:3] not in ((32, 32), (28, 28))
            or images.shape[3] not in (1, 3)):
        raise ValueError(f"{path}: expected uint8 images N x 32 x 32 (or 28 x 28) x 1 (or 3), "
                         f"got {images.dtype} {images.shape}")
    return name, images


def pixels(images: np.ndarray) -> np.ndarray:
    """Images as flat float64 rows in [0, 1] (28 px zero-padded to 32, RGB averaged, as the feature nets see them)."""
    return (_to_tensor(images).flatten(1).double().numpy() + 1.0) / 2.0


def copying(real_images: np.ndarray, models: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Median nearest-training-digit distance and the fraction closer than the real digits' 1st percentile."""
    real = pixels(real_images)
    loo = knn_radii(real, 1)  # each real digit to its nearest other one
    threshold = float(np.percentile(loo, COPY_PERCENTILE))
    out = {HELD_OUT: {"median_distance": float(np.median(loo)), "near_copies": float((loo < threshold).mean())}}
    for name, images in models.items():
        d = nearest_distances(pixels(images), real)
        out[name] = {"median_distance": float(np.median(d)), "near_copies": float((d < threshold).mean())}
    return out


def split_scores(real_images: np.ndarray, models: dict[str, np.ndarray], splits: int, nets: dict | None = None
                 ) -> dict[str, dict[str, list[float]]]:
    """Per row (held-out real, then each model) and `<space>_<measure>`: its value on each split."""
    nets = nets or {"classifier": default_classifier().eval(), "autoencoder": default_autoencoder().eval()}
    half = len(real_images) // 2
    short = {name: len(images) for name, images in models.items() if len(images) < half}
    if short:
        raise ValueError(f"each model needs at least {half} samples (half the real set); "
                         + ", ".join(f"{n} has {k}" for n, k in short.items()))
    real = {space: embed(net, _to_tensor(real_images)) for space, net in nets.items()}
    fake = {name: {space: embed(net, _to_tensor(images[:half])) for space, net in nets.items()}
            for name, images in models.items()}
    rows: dict[str, dict[str, list[float]]] = {}
    for s in range(splits):
        order = np.random.default_rng(s).permutation(len(real_images))
        a, b = order[:half], order[half:2 * half]
        for name in [HELD_OUT, *models]:
            for space in nets:
                x = real[space][b] if name == HELD_OUT else fake[name][space]
                values = neighbour_measures(real[space][a], x)
                for m in MEASURES:
                    rows.setdefault(name, {}).setdefault(f"{space}_{m}", []).append(values[m])
    return rows


def mean_sd(values: list[float]) -> str:
    text = f"{statistics.fmean(values):.3f}"
    return text + (f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def table(rows: dict, copies: dict, splits: int, half: int) -> str:
    names = list(rows)
    lines = [f"| measure ({splits} splits, {half} vs {half}; mean +- sd) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for key in rows[HELD_OUT]:
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(mean_sd(rows[n][key]) for n in names) + " |")
    lines.append("| median pixel distance to the nearest training digit (real: to the nearest other one) | "
                 + " | ".join(f"{copies[n]['median_distance']:.2f}" for n in names) + " |")
    lines.append(f"| fraction closer than the real digits' percentile {COPY_PERCENTILE} of those distances "
                 "(real: by construction) | " + " | ".join(f"{copies[n]['near_copies']:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def sample_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments the sample-file scripts share: NAME=FILE.npz models, --json, --table."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("models", nargs="+", metavar="NAME=FILE.npz", help="samples of each model (python -m dmd2 sample)")
    p.add_argument("--json", type=Path, help="write every value here")
    p.add_argument("--table", type=Path, help="write the markdown table(s) here")
    return p


def main(argv=None) -> None:
    p = sample_arguments(__doc__.splitlines()[0])
    p.add_argument("--splits", type=int, default=5, help="random halvings of the real digits (default 5)")
    a = p.parse_args(argv)
    if a.splits < 1:
        p.error(f"--splits must be at least 1, got {a.splits}")
    try:
        models = dict(load_samples(spec) for spec in a.models)
        if len(models) < len(a.models):
            raise ValueError("two models have the same name")
        real_images = real_digits()[0]
        rows = split_scores(real_images, models, a.splits)
    except ValueError as e:
        sys.exit(f"error: {e}")
    half = len(real_images) // 2
    copies = copying(real_images, {name: images[:half] for name, images in models.items()})  # the samples scored above
    text = table(rows, copies, a.splits, half)
    print(text, end="")
    if a.table:
        a.table.write_text(text)
    if a.json:
        a.json.write_text(json.dumps({"splits": a.splits, "half": half, "rows": rows,
                                      "copying": copies}, indent=2) + "\n")


if __name__ == "__main__":
    main()
