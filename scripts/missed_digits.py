"""Which real digits does each model miss? Recall attributed to each real digit, by class and by stroke attribute.

    python scripts/missed_digits.py teacher=runs/ceiling/teacher-set0.npz 1-step=runs/ceiling/1step-set0.npz \
        [--split 0] [--json results/missed-digits.json] [--table results/missed-digits.md] \
        [--figure docs/missed-digits.png --pair teacher,1-step]

The k-NN recall of `evaluate` counts the real digits that lie inside some sample's ball (radius: the sample's
distance to its 3rd nearest other sample). Here that verdict is kept per real digit. As in recall_ceiling.py the
5,000 real digits are split in halves A and B (numpy seed --split); each model's first len(B) samples, and B itself
("held-out real": fresh draws, the baseline), are scored against A in the classifier's and the autoencoder's
features. Reported: recall per class, and recall within each quartile of three stroke attributes of the real
digit (quartiles fixed on A): ink (mean intensity), width (the spread of the ink along x) and slant (the shear
moment mu11 / mu02). A model that misses the outer quartiles more than held-out real does loses the tails of
handwriting; one that misses a class loses a mode. --figure draws digits of A that the first model of --pair
recalls and the second misses (classifier space), beside ones both recall.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dmd2.metrics.independent import PR_K, default_autoencoder, embed
from dmd2.metrics.mnist import _to_tensor, default_classifier, real_digits
from dmd2.metrics.neighbours import inside_any_ball, knn_radii
from recall_ceiling import HELD_OUT, load_samples, sample_arguments

ATTRIBUTES = ("ink", "width", "slant")


def stroke_attributes(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (uint8 N x H x W x 1): ink (mean intensity in [0, 1]), width (standard deviation of the ink's x
    coordinate, pixels) and slant (mu11 / mu02: how far x moves per pixel of y, positive when the top leans right)."""
    x = images[..., 0].astype(np.float64) / 255.0
    n, h, w = x.shape
    mass = x.sum(axis=(1, 2))
    if (mass <= 0).any():
        raise ValueError(f"{int((mass <= 0).sum())} blank image(s): stroke attributes need ink")
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ys = (h - 1) - ys  # y grows upwards, so a top leaning right has a positive slant
    cx = (x * xs).sum(axis=(1, 2)) / mass
    cy = (x * ys).sum(axis=(1, 2)) / mass
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]
    mu20 = (x * dx ** 2).sum(axis=(1, 2)) / mass
    mu02 = (x * dy ** 2).sum(axis=(1, 2)) / mass
    mu11 = (x * dx * dy).sum(axis=(1, 2)) / mass
    return {"ink": x.mean(axis=(1, 2)), "width": np.sqrt(mu20), "slant": mu11 / mu02}


def recalled(real: np.ndarray, fake: np.ndarray, k: int = PR_K) -> np.ndarray:
    """Per real feature row: inside some fake sample's k-NN ball (the real digits evaluate's recall counts)."""
    return inside_any_ball(real, fake, knn_radii(fake, k))


def by_group(hits: np.ndarray, groups: np.ndarray, count: int) -> list[float]:
    """The mean of `hits` within each group 0..count-1 (NaN for an empty group)."""
    return [float(hits[groups == g].mean()) if (groups == g).any() else float("nan") for g in range(count)]


def attribute_scores(real_images: np.ndarray, labels: np.ndarray, models: dict[str, np.ndarray], split: int,
                     nets: dict | None = None) -> dict:
    """{space: {name: {"recall", "class", "<attribute>"}}} for held-out real and each model, plus the quartile
    edges, and the per-digit verdicts (for the figure)."""
    nets = nets or {"classifier": default_classifier().eval(), "autoencoder": default_autoencoder().eval()}
    half = len(real_images) // 2
    short = [f"{n} has {len(v)}" for n, v in models.items() if len(v) < half]
    if short:
        raise ValueError(f"each model needs at least {half} samples (half the real set); " + ", ".join(short))
    order = np.random.default_rng(split).permutation(len(real_images))
    a, b = order[:half], order[half:2 * half]
    attrs = stroke_attributes(real_images[a])
    edges = {name: np.quantile(values, [0.25, 0.5, 0.75]) for name, values in attrs.items()}
    quartile = {name: np.digitize(values, edges[name]) for name, values in attrs.items()}
    sets = {HELD_OUT: real_images[b], **{name: images[:half] for name, images in models.items()}}
    out: dict = {"split": split, "half": half, "edges": {k: v.tolist() for k, v in edges.items()}, "spaces": {}}
    verdicts: dict = {}
    for space, net in nets.items():
        real = embed(net, _to_tensor(real_images[a]))
        rows = out["spaces"][space] = {}
        for name, images in sets.items():
            hits = recalled(real, embed(net, _to_tensor(images)))
            verdicts[(space, name)] = hits
            rows[name] = {"recall": float(hits.mean()), "class": by_group(hits, labels[a], 10),
                          **{attr: by_group(hits, quartile[attr], 4) for attr in ATTRIBUTES}}
    return {"scores": out, "verdicts": verdicts, "real_a": real_images[a]}


def table(scores: dict) -> str:
    """One markdown table per feature space: recall overall, per class, per quartile of each attribute."""
    parts = []
    for space, rows in scores["spaces"].items():
        names = list(rows)
        lines = [f"**{space} features** (recall of the real digits of half A, {scores['half']} per set)", "",
                 "| real digits | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

        def row(label, values):
            lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |")

        row("all", [rows[n]["recall"] for n in names])
        for c in range(10):
            row(f"class {c}", [rows[n]["class"][c] for n in names])
        for attr in ATTRIBUTES:
            e = scores["edges"][attr]
            bounds = [f"< {e[0]:.3g}", f"{e[0]:.3g}-{e[1]:.3g}", f"{e[1]:.3g}-{e[2]:.3g}", f">= {e[2]:.3g}"]
            for q in range(4):
                row(f"{attr} Q{q + 1} ({bounds[q]})", [rows[n][attr][q] for n in names])
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def figure(real_a: np.ndarray, first: np.ndarray, second: np.ndarray, path: Path, count: int = 40) -> int:
    """Two blocks of up to `count` real digits, 8 a row: above, ones both models recall (`first`, `second`: the
    per-digit verdicts); below, ones only the first recalls. Returns how many digits the second block had to pick from."""
    both = np.flatnonzero(first & second)
    only_first = np.flatnonzero(first & ~second)
    rng = np.random.default_rng(0)
    pick = [rng.permutation(ids)[:count] for ids in (both, only_first)]
    cell, per_row = 34, 8
    rows_each = (count + per_row - 1) // per_row
    canvas = np.full(((2 * rows_each) * cell + 12, per_row * cell), 128, np.uint8)
    for block, ids in enumerate(pick):
        top = block * (rows_each * cell + 12)
        for i, idx in enumerate(ids):
            r, c = divmod(i, per_row)
            canvas[top + r * cell + 1: top + r * cell + 33, c * cell + 1: c * cell + 33] = real_a[idx, ..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).resize((canvas.shape[1] * 2, canvas.shape[0] * 2), Image.NEAREST).save(path)
    return len(only_first)


def main(argv=None) -> None:
    p = sample_arguments(__doc__.splitlines()[0])
    p.add_argument("--split", type=int, default=0, help="numpy seed of the halving of the real digits (default 0)")
    p.add_argument("--figure", type=Path, help="a PNG of digits the first model of --pair recalls and the second misses")
    p.add_argument("--pair", default=None, help="FIRST,SECOND model names for --figure")
    a = p.parse_args(argv)
    try:
        models = dict(load_samples(spec) for spec in a.models)
        if len(models) < len(a.models):
            raise ValueError("two models have the same name")
        pair = None
        if a.figure:
            pair = (a.pair or "").split(",")
            if len(pair) != 2 or not all(name in models for name in pair):
                raise ValueError(f"--figure needs --pair FIRST,SECOND naming two of the models ({', '.join(models)})")
        real_images, labels = real_digits()
        result = attribute_scores(real_images, labels, models, a.split)
    except ValueError as e:
        sys.exit(f"error: {e}")
    text = table(result["scores"])
    print(text, end="")
    if pair:
        first, second = (result["verdicts"][("classifier", name)] for name in pair)
        only_first = figure(result["real_a"], first, second, a.figure)
        result["scores"]["figure"] = {"path": str(a.figure), "pair": pair, "only_first": only_first}
        print(f"{a.figure}: top, digits both recall; below, {min(only_first, 40)} of the {only_first} digits "
              f"{pair[0]} recalls and {pair[1]} misses (classifier space)")
    if a.table:
        a.table.write_text(text)
    if a.json:
        a.json.write_text(json.dumps(result["scores"], indent=2) + "\n")


if __name__ == "__main__":
    main()
