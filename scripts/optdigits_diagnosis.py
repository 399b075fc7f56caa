"""Where does the optdigits reader's FID loss sit? Per class, in the block counts, in the strokes.

    python scripts/optdigits_diagnosis.py --model teacher=mnist-teacher \
        --model "4-step preset=runs/seeds-fp32/mnist-4step-last-only-seed0/student,..." \
        [--sample-sets 0 1] [--num 5000] [--samples runs/optdiag] [--results results/optdigits]

Rows as in scripts/outside_check.py (`LABEL=MODEL[,MODEL...]`, several models are a row's training seeds; the first
row is the reference). Each model's sample set k is `python -m dmd2 sample --model MODEL --num N --seed <1000 k>`
(the images of `evaluate --seed <1000 k>`), kept in `<samples>/<model as a file name>-set<k>.npz` and reused when
it names that model and seed and no other sampling option (`sample` records them: a `--teacher-until` file is not
plain samples), holds N images and is newer than the model's weights. Per model and set, against the 5,000 real digits:
- `fid`: the optdigits reader's FID on the whole set (as `evaluate --optdigits`);
- `class_fid`: per class c, the samples asked for c against the real digits of class c, in the reader's features
  (a list of ten), and `class_fid_mean`, their mean;
- `count_fid`: the Frechet distance on the 64 block counts / 16 (the reader's input; no network);
- `count_spread`: the block counts' within-class variety, per class the trace of their covariance, averaged over the
  classes, as a ratio to the real digits' (1: as varied as the real digits);
- pixel statistics of each image before the mapping, as their mean (`<stat>_mean`) and the Wasserstein-1 distance of
  their distribution to the real digits' (`<stat>_w1`): `ink` (pixels >= 128), `stroke` (2 x ink / perimeter, the
  perimeter by the Cauchy-Crofton formula, `crofton_perimeter`: a stroke of width w and length L >> w gives about
  w pixels at any angle), `darkness` (the mean
  value of ink pixels, 0..1) and `slant` (`dmd2.metrics.optdigits.slant`).
Writes `<results>/diagnosis.json` (every value) and `<results>/diagnosis.md` (the table and the counts of classes
each row loses against the first), and prints the table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from outside_check import checked_rows, fmt, model_mtime, result_path, row_parser

from dmd2.sampling import sample_set_seed

ROOT = Path(__file__).resolve().parent.parent
STATS = ("ink", "stroke", "darkness", "slant")
DISTANCES = {"fid", "class_fid_mean", "count_fid"} | {f"{s}_w1" for s in STATS}   # lower = closer to the real digits
MIN_NUM = 650   # per-class FID needs 65 samples of each of the ten classes
COLUMNS = [("fid", "FID"), ("class_fid_mean", "per-class FID (mean of 10)"), ("count_fid", "count FID"),
           ("count_spread", "count spread (real = 1)")] + [
    (f"{s}_{k}", f"{s} {'W1' if k == 'w1' else 'mean'}") for s in STATS for k in ("mean", "w1")]


def crofton_perimeter(ink: np.ndarray) -> np.ndarray:
    """The ink's boundary length per image (N x H x W bool), by the Cauchy-Crofton formula on four directions: ink /
    background transitions along rows and columns (lines 1 px apart) and both diagonals (1 / sqrt 2 px apart),
    pi / 8 (n_0 + n_90 + (n_45 + n_135) / sqrt 2). Counting pixel sides alone reads a 45-degree boundary sqrt 2 too
    long; this reads a disc of radius 20 px within 2%, and 2 x area / perimeter of straight 20 px strokes 2-4 px wide
    within 8% of their rasterised width at any angle (1 px strokes read 0.9-1.15)."""
    p = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    n0 = (p[:, :, 1:] != p[:, :, :-1]).sum((1, 2))
    n90 = (p[:, 1:] != p[:, :-1]).sum((1, 2))
    n45 = (p[:, 1:, 1:] != p[:, :-1, :-1]).sum((1, 2))
    n135 = (p[:, 1:, :-1] != p[:, :-1, 1:]).sum((1, 2))
    return np.pi / 8 * (n0 + n90 + (n45 + n135) / np.sqrt(2))


def pixel_stats(images_uint8) -> dict[str, np.ndarray]:
    """Per image (N x H x W [x 1] uint8, ink bright): ink area, stroke width, darkness and slant (module docstring)."""
    import torch

    from dmd2.metrics.optdigits import slant

    x = np.asarray(images_uint8)
    x = x.reshape(x.shape[0], x.shape[1], x.shape[2])
    ink = x >= 128
    area = ink.sum((1, 2))
    perimeter = crofton_perimeter(ink)
    stroke = np.where(perimeter > 0, 2.0 * area / np.maximum(perimeter, 1e-9), 0.0)
    darkness = np.where(area > 0, (x * ink).sum((1, 2)) / np.maximum(area, 1) / 255.0, 0.0)
    t = torch.from_numpy(x.astype(np.float32) / 255.0)[:, None]
    return dict(ink=area.astype(np.float64), stroke=stroke, darkness=darkness, slant=slant(t).numpy().astype(np.float64))


def class_fids(fake: np.ndarray, fake_labels: np.ndarray, real: np.ndarray, real_labels: np.ndarray) -> list[float]:
    """FID of each class's samples against that class's real digits (features N x D; classes 0..max label)."""
    from dmd2.metrics.frechet import feature_stats, frechet_distance

    out, need = [], fake.shape[1] + 1      # fewer samples than that leave the class's covariance singular
    for c in range(int(real_labels.max()) + 1):
        f, r = fake[fake_labels == c], real[real_labels == c]
        if len(f) < need:
            raise ValueError(f"class {c}: {len(f)} samples; every class needs at least {need} ({fake.shape[1]}-d "
                             "features; fewer leave its covariance singular)")
        out.append(frechet_distance(*feature_stats(f), *feature_stats(r)))
    return out


def class_spread(x: np.ndarray, labels: np.ndarray) -> float:
    """The total variance (trace of the covariance) of each class's rows of x, averaged over the classes present."""
    from dmd2.metrics.mnist import _class_spread      # per class: sqrt of that trace

    return float(np.mean([rms ** 2 for rms in _class_spread(x, labels).values()]))


def diagnose(images, labels, real_images, real_labels, net=None) -> dict:
    """Every value of the module docstring for one sample set."""
    import torch

    from dmd2.metrics.frechet import feature_stats, frechet_distance
    from dmd2.metrics.independent import embed
    from dmd2.metrics.mnist import _to_tensor
    from dmd2.metrics.optdigits import default_optdigits_net, to_optdigits

    net = (default_optdigits_net() if net is None else net).eval()
    labels, real_labels = np.asarray(labels).reshape(-1), np.asarray(real_labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    fake_f, real_f = embed(net, _to_tensor(images)), embed(net, _to_tensor(real_images))
    with torch.no_grad():
        fake_c, real_c = (to_optdigits(images) / 16).double().numpy(), (to_optdigits(real_images) / 16).double().numpy()
    per_class = class_fids(fake_f, labels, real_f, real_labels)
    out = dict(num=len(images), fid=frechet_distance(*feature_stats(fake_f), *feature_stats(real_f)),
               class_fid=per_class, class_fid_mean=float(np.mean(per_class)),
               count_fid=frechet_distance(*feature_stats(fake_c), *feature_stats(real_c)),
               count_spread=class_spread(fake_c, labels) / class_spread(real_c, real_labels))
    return {**out, **stat_distances(images, real_images)}


def stat_distances(images, real_images) -> dict[str, float]:
    """Each pixel statistic's mean over `images` (`<stat>_mean`) and the Wasserstein-1 distance of its distribution
    to the real images' (`<stat>_w1`)."""
    from scipy.stats import wasserstein_distance

    fake_s, real_s = pixel_stats(images), pixel_stats(real_images)
    out = {}
    for s in STATS:
        out[f"{s}_mean"] = float(fake_s[s].mean())
        out[f"{s}_w1"] = float(wasserstein_distance(fake_s[s], real_s[s]))
    return out


def real_reference() -> dict:
    """The real digits' own pixel-statistic means (their W1 to themselves is 0)."""
    from dmd2.metrics.mnist import real_digits

    stats = pixel_stats(real_digits()[0])
    return {f"{s}_mean": float(stats[s].mean()) for s in STATS}


def samples_path(samples: Path, model: str, sample_set: int) -> Path:
    return result_path(samples, model, sample_set, ".npz")


def load_samples(path: Path, model: str, seed: int, num: int):
    """(images, labels) of an npz that `python -m dmd2 sample` wrote for this model, seed and count with no other
    option (its `options` record empty: the images `evaluate --seed` scores), newer than the model's weights; None
    when it is missing, unreadable (a truncated file), made otherwise (another option, e.g. `--teacher-until`, or
    before `sample` recorded its options), or older."""
    try:
        with np.load(path) as held:
            images, labels = held["images"], held["labels"]
            made = (str(held["model"]), int(held["seed"]), json.loads(str(held["options"])))
    except (OSError, KeyError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    if made != (model, seed, {}) or images.ndim < 3 or len(images) != num or labels.shape != (num,):
        return None
    return (images, labels) if path.stat().st_mtime >= model_mtime(model) else None


def sample_command(model: str, seed: int, num: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "dmd2", "sample", "--model", model, "--num", str(num), "--seed", str(seed),
            "--out", str(out)]


def sample_set(samples: Path, model: str, k: int, num: int):
    """(images, labels) of the model's sample set k: the kept npz when `load_samples` takes it, else sampled now with
    `python -m dmd2 sample` (SystemExit when that fails)."""
    path, seed = samples_path(samples, model, k).resolve(), sample_set_seed(k)   # sampling runs in ROOT
    held = load_samples(path, model, seed, num)
    if held is None:
        cmd = sample_command(model, seed, num, path)
        print("$ " + " ".join(cmd), flush=True)
        failed = subprocess.run(cmd, cwd=ROOT).returncode != 0
        if failed or (held := load_samples(path, model, seed, num)) is None:
            raise SystemExit(f"error: sampling {model} for sample set {k} failed")
    return held


def seed_means(sets: list[dict]) -> dict[str, float]:
    """One model's value per column: the mean over its sample sets (class_fid per class too)."""
    out = {k: statistics.fmean(r[k] for r in sets) for k, _ in COLUMNS}
    out["class_fid"] = [statistics.fmean(r["class_fid"][c] for r in sets) for c in range(len(sets[0]["class_fid"]))]
    return out


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.fmean(values))} ± {fmt(statistics.stdev(values))}"


def table(rows: dict[str, list[list[dict]]], real: dict | None = None) -> str:
    """Markdown: per row, each column's mean over seeds (± sd over seeds when several); then, per row against the
    first, the distances (FIDs, W1s) on which every seed is farther from the real digits than the first row's mean,
    those on which every seed is closer, and how many of the ten classes each seed loses (a per-class FID above the
    first row's mean for that class)."""
    seeds = {label: [seed_means(sets) for sets in models] for label, models in rows.items()}
    lines = ["| model | seeds | " + " | ".join(name for _, name in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for label, values in seeds.items():
        lines.append(f"| {label} | {len(values)} | " + " | ".join(cell([v[k] for v in values]) for k, _ in COLUMNS)
                     + " |")
    if real is not None:
        lines.append("| real digits | - | 0 | 0 | 0 | 1 | " + " | ".join(f"{fmt(real[f'{s}_mean'])} | 0" for s in STATS)
                     + " |")
    first = next(iter(seeds))
    ref = seeds[first]
    ref_class = [statistics.fmean(v["class_fid"][c] for v in ref) for c in range(len(ref[0]["class_fid"]))]
    lines.append("")
    for label, values in seeds.items():
        if label == first:
            continue
        every = "every seed " if len(values) > 1 else ""
        farther, closer = [], []       # the distances to the real digits (not the means, not the spread)
        for key, name in COLUMNS:
            if key not in DISTANCES:
                continue
            mean = statistics.fmean(v[key] for v in ref)
            if all(v[key] > mean for v in values):
                farther.append(name)
            elif all(v[key] < mean for v in values):
                closer.append(name)
        lost = [sum(v["class_fid"][c] > ref_class[c] for c in range(len(ref_class))) for v in values]
        spread = statistics.fmean(v["count_spread"] for v in ref)
        varied = ("less" if all(v["count_spread"] < spread for v in values) else
                  "more" if all(v["count_spread"] > spread for v in values) else None)
        lines.append(f"- {label} against {first}: {every}farther from the real digits on {', '.join(farther) or 'none'};"
                     f" {every}closer on {', '.join(closer) or 'none'}; per-class FID above {first}'s in "
                     f"{' / '.join(map(str, lost))} of {len(ref_class)} classes{' (per seed)' if len(values) > 1 else ''};"
                     + (f" {every}{varied} varied within classes (count spread)" if varied else
                        " count spread on both sides"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = row_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", default="runs/optdiag", help="where the sample sets are kept (npz)")
    a = p.parse_args(argv)
    samples, results = Path(a.samples), Path(a.results)
    if samples.exists() and not samples.is_dir():
        p.error(f"--samples {samples}: is a file, not a folder")
    rows = checked_rows(p, a, MIN_NUM, "65 samples of each class: the reader's features are 64-d")
    samples.mkdir(parents=True, exist_ok=True)

    from dmd2.metrics.mnist import real_digits

    real_images, real_labels = real_digits()
    done: dict[str, list[list[dict]]] = {}
    record = {}
    for label, models in rows.items():
        done[label] = []
        for model in models:
            sets = []
            for k in a.sample_sets:
                result = diagnose(*sample_set(samples, model, k, a.num), real_images, real_labels)
                record[f"{model}-set{k}"] = dict(model=model, row=label, sample_set=k, seed=sample_set_seed(k),
                                                 **result)
                sets.append(result)
            done[label].append(sets)
    real = real_reference()
    text = table(done, real)
    from dmd2.metrics.optdigits import instrument_id

    (results / "diagnosis.json").write_text(json.dumps(dict(instrument=instrument_id(), real=real, sets=record),
                                                       indent=1) + "\n")
    (results / "diagnosis.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
