"""Score MNIST models with the instrument that has seen no MNIST digit (dmd2.metrics.optdigits) and table them.

    python scripts/outside_check.py --model teacher=mnist-teacher --model 1-step=mnist-dmd2-1step \
        --model "4-step preset=runs/seeds/mnist-4step-last-only-seed0/student,runs/seeds/...-seed1/student" \
        [--versus "4-step preset=1-step"] [--sample-sets 0 1] [--num 5000] [--results results/optdigits]

Each `--model LABEL=MODEL[,MODEL...]` is one row; several models in a row are its training seeds. Every model is
scored on each sample set k by `python -m dmd2 evaluate --model MODEL --seed <1000 k> --optdigits` (every measure of
evaluate, and this space's) into `<results>/<model as a file name>-set<k>.json`; sets are 1,000 seeds apart so that
they share no image (`dmd2.sampling.sample_set_seed`). A result that exists is kept when it names the model, count,
seed and instrument (`dmd2.metrics.optdigits.instrument_id`: the network's files and the mapping's constants) and no
weight or config file of the model's folder is newer. The table (`<results>/table.md`, also printed)
gives per measure the row's mean over seeds of each seed's mean over sample sets, its standard deviation and range
over seeds (one seed: the sample sets' values); then, for each row against the first (the reference, e.g. the
teacher) and each `--versus A=B` pair, the measures on which every seed of A beats B's mean, and those on which
every seed loses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from seeds import beats, load_result

from dmd2.families.base import ModelLoadError
from dmd2.sampling import sample_set_seed

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILES = (".safetensors", ".bin", ".json")   # what a retrained or re-exported model rewrites

MEASURES = [  # (key, label, better): as in seeds.py; density is best at 1
    ("optdigits_fid", "FID", "lower"),
    ("optdigits_kid", "KID", "lower"),
    ("optdigits_precision", "precision", "higher"),
    ("optdigits_recall", "recall", "higher"),
    ("optdigits_density", "density", "one"),
    ("optdigits_coverage", "coverage", "higher"),
    ("optdigits_alignment", "alignment", "higher"),
]


def parse_row(text: str) -> tuple[str, list[str]]:
    """'LABEL=MODEL[,MODEL...]' -> (label, models); SystemExit naming the bad argument."""
    label, sep, models = text.partition("=")
    names = [m.strip() for m in models.split(",") if m.strip()]
    if not sep or not label.strip() or not names:
        raise SystemExit(f"error: --model {text!r}: expected LABEL=MODEL[,MODEL...]")
    return label.strip(), names


def result_path(results: Path, model: str, sample_set: int, suffix: str = ".json") -> Path:
    """`<results>/<model as a file name>-set<k><suffix>`."""
    slug = model.strip("/").replace("/", "_").replace("\\", "_")
    return results / f"{slug}-set{sample_set}{suffix}"


def model_folder(model: str) -> Path | None:
    """The folder a registry name or a model path loads from (None when there is no such model)."""
    from dmd2 import registry

    try:
        return Path(registry.spec_for(model).path)
    except (ModelLoadError, ValueError, KeyError, OSError):
        return None


def is_current(out: Path, model: str, num: int, seed: int, instrument: str | None = None) -> bool:
    """Does `out` hold this model's optdigits scores on `num` samples of this seed, by this instrument (its
    `instrument_id`; default: the committed network's), newer than every weight and config file of the model's
    folder?"""
    if not out.is_file():
        return False
    if instrument is None:
        from dmd2.metrics.optdigits import instrument_id

        instrument = instrument_id()
    try:
        held = json.loads(out.read_text())
        if (held.get("model"), held.get("num"), held.get("seed")) != (model, num, seed) or "optdigits_fid" not in held:
            return False
        if held.get("optdigits_instrument") != instrument:   # another network or mapping scored it
            return False
    except (ValueError, OSError, AttributeError):
        return False
    return out.stat().st_mtime >= model_mtime(model)


def model_mtime(model: str) -> float:
    """When the model's newest weight or config file was written (not a card edited since; 0 without a folder)."""
    folder = model_folder(model)
    if folder is None or not folder.is_dir():
        return 0.0
    return max((f.stat().st_mtime for f in folder.rglob("*") if f.is_file() and f.suffix in MODEL_FILES), default=0.0)


def evaluate_command(model: str, seed: int, num: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "dmd2", "evaluate", "--model", model, "--num", str(num), "--seed", str(seed),
            "--optdigits", "--json", str(out)]


def fmt(value: float) -> str:
    """Three decimals for every measure (this space's FID and KID are small numbers: its features are small)."""
    return f"{value:.3f}"


def row_values(results: list[list[dict]]) -> list[dict[str, float]]:
    """Per seed (a list of its sample sets' results), each measure's mean over the sets."""
    return [{k: statistics.fmean(r[k] for r in sets) for k, _, _ in MEASURES} for sets in results]


def cell(seeds: list[dict[str, float]], sets: list[list[dict]], key: str) -> str:
    if len(seeds) == 1:
        values = [r[key] for r in sets[0]]
        return fmt(seeds[0][key]) + (f" ({' / '.join(fmt(v) for v in values)})" if len(values) > 1 else "")
    values = [s[key] for s in seeds]
    return f"{fmt(statistics.fmean(values))} ± {fmt(statistics.stdev(values))} [{fmt(min(values))}, {fmt(max(values))}]"


def compare(a: list[dict[str, float]], b: list[dict[str, float]]) -> tuple[list[str], list[str]]:
    """The measures on which every seed of `a` beats the mean of `b`, and those on which every seed loses."""
    wins, losses = [], []
    for key, label, better in MEASURES:
        ref = statistics.fmean(s[key] for s in b)
        if all(beats(s[key], ref, better) for s in a):
            wins.append(label)
        elif all(beats(ref, s[key], better) for s in a):
            losses.append(label)
    return wins, losses


def table(rows: dict[str, list[list[dict]]], versus: list[tuple[str, str]], real_alignment: float | None) -> str:
    seeds = {label: row_values(sets) for label, sets in rows.items()}
    first = next(iter(rows))
    lines = ["| model | seeds | " + " | ".join(label for _, label, _ in MEASURES) + " |",
             "|---" * (len(MEASURES) + 2) + "|"]
    for label, sets in rows.items():
        lines.append(f"| {label} | {len(sets)} | "
                     + " | ".join(cell(seeds[label], sets, key) for key, _, _ in MEASURES) + " |")
    if real_alignment is not None:
        lines.append(f"\nThe real digits' alignment in this space (its accuracy on them): {real_alignment:.3f}.")
    lines.append("")
    pairs = [(label, first) for label in rows if label != first] + versus
    for a, b in pairs:
        wins, losses = compare(seeds[a], seeds[b])
        n = len(seeds[a])
        lines.append(f"- {a} against {b}: {'every seed ' if n > 1 else ''}beats it on {len(wins)} of {len(MEASURES)}"
                     f" ({', '.join(wins) or 'none'}); {'every seed ' if n > 1 else ''}loses on "
                     f"{', '.join(losses) or 'none'}")
    return "\n".join(lines) + "\n"

def row_parser(description: str) -> argparse.ArgumentParser:
    """The arguments this script shares with scripts/optdigits_diagnosis.py: rows of models, sample sets, count,
    results folder."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", action="append", required=True, metavar="LABEL=MODEL[,MODEL...]",
                   help="a row; several models are its seeds; the first row is the reference")
    p.add_argument("--sample-sets", type=int, nargs="+", default=[0, 1])
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--results", default="results/optdigits")
    return p


def checked_rows(p: argparse.ArgumentParser, a, min_num: int, why: str) -> dict[str, list[str]]:
    """The rows of `row_parser`'s arguments, each model checked to exist; p.error names a bad argument. Makes the
    results folder."""
    if a.num < min_num:
        p.error(f"--num must be at least {min_num} ({why}), got {a.num}")
    if len(set(a.sample_sets)) != len(a.sample_sets) or min(a.sample_sets) < 0:
        p.error(f"--sample-sets must be distinct and >= 0, got {a.sample_sets}")
    rows = dict(parse_row(m) for m in a.model)
    if len(rows) != len(a.model):
        p.error("two --model rows share a label")
    for label, models in rows.items():
        for model in models:
            folder = model_folder(model)
            if folder is None or not folder.is_dir():
                p.error(f"--model {label}={model}: no such model (a registry name or a student folder)")
    results = Path(a.results)
    if results.exists() and not results.is_dir():
        p.error(f"--results {results}: is a file, not a folder")
    results.mkdir(parents=True, exist_ok=True)
    return rows


def main(argv=None) -> None:
    p = row_parser(__doc__.splitlines()[0])
    p.add_argument("--versus", action="append", default=[], metavar="A=B", help="also compare row A with row B")
    p.add_argument("--dry-run", action="store_true", help="print what would be scored, score nothing")
    a = p.parse_args(argv)
    rows = checked_rows(p, a, 4, "precision and recall need more samples than neighbours")
    versus = []
    for v in a.versus:
        x, _, y = v.partition("=")
        if x.strip() not in rows or y.strip() not in rows:
            p.error(f"--versus {v!r}: both sides must be --model labels ({', '.join(rows)})")
        versus.append((x.strip(), y.strip()))
    results = Path(a.results)
    scored = {}
    for label, models in rows.items():
        scored[label] = []
        for model in models:
            sets = []
            for k in a.sample_sets:
                out, seed = result_path(results, model, k), sample_set_seed(k)
                if not is_current(out, model, a.num, seed):
                    cmd = evaluate_command(model, seed, a.num, out)
                    print("$ " + " ".join(cmd), flush=True)
                    if a.dry_run:
                        continue
                    done = subprocess.run(cmd, cwd=ROOT)
                    if done.returncode != 0:
                        raise SystemExit(f"error: scoring {model} on sample set {k} failed (exit {done.returncode})")
                if out.is_file():
                    sets.append(load_result(out))
            scored[label].append(sets)
    if a.dry_run:
        return
    import torch

    from dmd2.metrics.mnist import real_digits
    from dmd2.metrics.optdigits import default_optdigits_net, to_optdigits

    images, labels = real_digits()
    with torch.no_grad():
        real_alignment = float((default_optdigits_net()(to_optdigits(images)).argmax(1).numpy() == labels).mean())
    text = table(scored, versus, real_alignment)
    (results / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
