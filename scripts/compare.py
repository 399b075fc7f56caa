"""Compare models on every measure of `python -m dmd2 evaluate`: one column per model (its mean over the
sample sets given, and their range), then, for each model, the measures on which every one of its sample sets
beats the reference model's mean ("beats"), those on which the reference's mean beats every one ("loses"), and
the rest ("mixed or tied").

    python scripts/compare.py teacher=results/teacher-independent-seed0.json \
        1-step=results/dmd2-1step-independent-seed0.json,results/dmd2-1step-independent-seed1.json \
        [--against teacher]

The first model is the reference unless --against names another. The measures, their directions and the
selection measure (the classifier FID, which picked the recipes) are those of scripts/seeds.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import MEASURES, beats, fmt, load_result  # noqa: E402


def cell(values: list[float], key: str) -> str:
    """A model's mean over its sample sets, with the range when there are several."""
    text = fmt(statistics.fmean(values), key)
    if len(values) > 1:
        text += f" ({fmt(min(values), key)}-{fmt(max(values), key)})"
    return text


def has(runs: list[dict], key: str) -> bool:
    return all(r.get(key) is not None for r in runs)


def verdicts(runs: list[dict], reference: list[dict]) -> dict[str, list[str]]:
    """Per measure: "wins" when every sample set of `runs` beats the reference's mean, "loses" when the
    reference's mean beats every one, "mixed" otherwise (sets either way, or ties); "missing" when a file
    lacks it."""
    out = {"wins": [], "loses": [], "mixed": [], "missing": []}
    for key, label, better in MEASURES:
        if not has(runs + reference, key):
            out["missing"].append(label)
            continue
        ref = statistics.fmean(r[key] for r in reference)
        if all(beats(r[key], ref, better) for r in runs):
            out["wins"].append(label)
        elif all(beats(ref, r[key], better) for r in runs):
            out["loses"].append(label)
        else:
            out["mixed"].append(label)
    return out


def compare(models: dict[str, list[dict]], against: str) -> str:
    """The table and, per model other than `against`, the measures it wins, loses and splits against it."""
    names = list(models)
    lines = ["| measure | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for key, label, _ in MEASURES:
        if any(has(runs, key) for runs in models.values()):
            cells = [cell([r[key] for r in models[n]], key) if has(models[n], key) else "-" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in names:
        if name == against:
            continue
        v = verdicts(models[name], models[against])
        sets = "its sample set" if len(models[name]) == 1 else f"each of its {len(models[name])} sample sets"
        text = f"\n{name} beats {against} on {len(v['wins'])} of {len(v['wins']) + len(v['loses']) + len(v['mixed'])}"
        text += f" measures ({sets}, against {against}'s mean)."
        for what, label in (("loses", "Loses on"), ("mixed", "Mixed or tied on"), ("missing", "Not in every file")):
            if v[what]:
                text += f" {label}: {', '.join(v[what])}."
        lines.append(text)
    return "\n".join(lines)


def check_sample_sets(name: str, runs: list[dict]) -> str | None:
    """Why a model's files are not sample sets of one evaluation, or None: they must name the same model,
    sample count and network evaluations (NFE: steps, and CFG's second pass; `steps` is written only when given),
    and different sample seeds."""
    for field in ("model", "num", "nfe"):
        if len({json.dumps(r.get(field)) for r in runs}) > 1:
            return f"{name}: its files differ in {field!r}: {[r.get(field) for r in runs]}"
    seeds = [r.get("seed") for r in runs]
    if len(set(seeds)) < len(seeds):
        return f"{name}: two of its files are the same sample set (seeds {seeds})"
    return None


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
        problem = check_sample_sets(name, models[name])
        if problem:
            p.error(problem)
    against = a.against or next(iter(models))
    if against not in models:
        p.error(f"--against {against!r} is not one of the models: {', '.join(models)}")
    print(compare(models, against))


if __name__ == "__main__":
    main()
