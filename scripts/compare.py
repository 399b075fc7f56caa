"""Compare models on every measure of `python -m dmd2 evaluate`: one column per model (its mean over the
sample sets given, and their range), then, for each model, the measures on which every one of its sample sets
beats the reference model's mean, and those on which it does not.

    python scripts/compare.py teacher=results/teacher-independent-seed0.json \
        1-step=results/dmd2-1step-independent-seed0.json,results/dmd2-1step-independent-seed1.json \
        [--against teacher]

The first model is the reference unless --against names another. The measures, their directions and the
selection measure (the classifier FID, which picked the recipes) are those of scripts/seeds.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import MEASURES, beats, fmt, load_result  # noqa: E402


def cell(values: list[float], key: str) -> str:
    """A model's mean over its sample sets, with the range when there are several."""
    text = fmt(statistics.fmean(values), key)
    return text + f" ({fmt(min(values), key)}-{fmt(max(values), key)})" if len(values) > 1 else text


def compare(models: dict[str, list[dict]], against: str) -> str:
    """The table and, per model other than `against`, which measures all its sample sets win against its mean."""
    names = list(models)
    lines = ["| measure | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for key, label, _ in MEASURES:
        if not any(key in r for runs in models.values() for r in runs):
            continue
        cells = [cell([r[key] for r in models[n]], key) if all(key in r for r in models[n]) else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    reference = models[against]
    for name in names:
        if name == against:
            continue
        wins, losses = [], []
        for key, label, better in MEASURES:
            if not all(key in r for r in reference + models[name]):
                continue
            ref = statistics.fmean(r[key] for r in reference)
            (wins if all(beats(r[key], ref, better) for r in models[name]) else losses).append(label)
        sets = "its sample set" if len(models[name]) == 1 else f"each of its {len(models[name])} sample sets"
        lines.append(f"\n{name} beats {against} on {len(wins)} of {len(wins) + len(losses)} measures ({sets})"
                     + (f"; not on: {', '.join(losses)}." if losses else "."))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="NAME=JSON[,JSON...]", help="a model and its evaluate JSONs")
    p.add_argument("--against", help="the reference model (default: the first)")
    a = p.parse_args(argv)
    models = {}
    for item in a.models:
        name, sep, files = item.partition("=")
        if not sep or not name or not files:
            p.error(f"{item!r} must look like NAME=JSON[,JSON...]")
        if name in models:
            p.error(f"model {name!r} is given twice")
        models[name] = [load_result(Path(f)) for f in files.split(",")]
    against = a.against or next(iter(models))
    if against not in models:
        p.error(f"--against {against!r} is not one of the models: {', '.join(models)}")
    print(compare(models, against))


if __name__ == "__main__":
    main()
