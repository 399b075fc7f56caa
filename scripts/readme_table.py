"""README's Results table, made from the evaluate JSONs it summarises, so every number in it can be traced and re-made.

    python scripts/readme_table.py                    # print the table
    python scripts/readme_table.py --check README.md  # exit 1, naming the rows, where README's table differs

A column is either one trained model scored on several sample sets (its mean over them, and their range where
it exceeds 0.003) or a preset trained for several seeds by scripts/seeds.py (the mean over seeds of each seed's
mean over its sample sets, +- the sd over seeds). Bold marks the best of a row, compared before rounding (first
column on a tie). Measures, directions and formats are scripts/seeds.py's. tests/test_readme_table.py runs --check.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import MEASURES, ROOT, fmt, load_result  # noqa: E402

RESULTS = ROOT / "results"
DIRECTION = {key: better for key, _, better in MEASURES}
SHOWN_RANGE = 0.003   # a sample-set range this small or smaller is left out


def sample_sets(*names: str) -> list[list[Path]]:
    """One model scored on several sample sets: a single "seed" whose sets are these files."""
    return [[RESULTS / n for n in names]]


def preset(name: str, seeds=(0, 1, 2), sets=(0, 1)) -> list[list[Path]]:
    """scripts/seeds.py's files for `name`: one list of sample-set files per training seed."""
    return [[RESULTS / "seeds" / f"{name}-seed{s}-set{k}.json" for k in sets] for s in seeds]


COLUMNS = [  # (heading, files per seed); the embedded models' second set is `--seed 1000` (scripts/outside_check.py)
    ("teacher, 50 DDIM steps", sample_sets("teacher-independent-seed0.json", "optdigits/mnist-teacher-set1.json")),
    ("DMD2 1-step student", sample_sets("dmd2-1step-independent-seed0.json", "optdigits/mnist-dmd2-1step-set1.json")),
    ("DMD2 2-step student", sample_sets("seeds/mnist-2step-t749-last-seed0-set0.json",
                                        "optdigits/mnist-dmd2-2step-set1.json")),
    ("DMD2 4-step student", sample_sets("seeds/mnist-4step-last-only-seed0-set0.json",
                                        "optdigits/mnist-dmd2-4step-last-set1.json")),
    ("1-step preset, 3 seeds", preset("mnist-1step")),
    ("2-step preset, 3 seeds", preset("mnist-2step-t749-last")),
    ("4-step preset, 3 seeds", preset("mnist-4step-last-only")),
]

ROWS = [  # (label, measures in the cell)
    ("FID (classifier; selection)", ["fid"]),
    ("alignment", ["alignment"]),
    ("diversity ratio (1 = the data's)", ["diversity_ratio"]),
    ("KID (classifier)", ["classifier_kid"]),
    ("precision / recall (classifier)", ["classifier_precision", "classifier_recall"]),
    ("density / coverage (classifier)", ["classifier_density", "classifier_coverage"]),
    ("FID (autoencoder)", ["autoencoder_fid"]),
    ("KID (autoencoder)", ["autoencoder_kid"]),
    ("precision / recall (autoencoder)", ["autoencoder_precision", "autoencoder_recall"]),
    ("density / coverage (autoencoder)", ["autoencoder_density", "autoencoder_coverage"]),
]


def summary(seeds: list[list[dict]], key: str) -> tuple[float, float | None, tuple[float, float] | None]:
    """(mean, sd over seeds or None, sample-set range or None) of one measure for one column."""
    if len(seeds) == 1:
        values = [r[key] for r in seeds[0]]
        return statistics.fmean(values), None, (min(values), max(values))
    means = [statistics.fmean(r[key] for r in sets) for sets in seeds]
    return statistics.fmean(means), statistics.stdev(means), None


def badness(value: float, better: str) -> float:
    """Smaller is better, whatever the measure's direction."""
    return {"lower": value, "higher": -value, "one": abs(value - 1)}[better]


def text(value: float, sd: float | None, span: tuple[float, float] | None, key: str, best: bool) -> str:
    out = f"**{fmt(value, key)}**" if best else fmt(value, key)
    if sd is not None:
        out += f" +- {fmt(sd, key)}"
    if span is not None:
        lo, hi = (fmt(v, key) for v in span)
        if float(hi) - float(lo) > SHOWN_RANGE + 1e-9:
            out += f" ({lo}-{hi})"
    return out


def make_table(columns=COLUMNS, rows=ROWS) -> str:
    loaded = [[[load_result(path) for path in sets] for sets in seeds] for _, seeds in columns]
    lines = ["| measure | " + " | ".join(heading for heading, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, keys in rows:
        cells = [[] for _ in columns]
        for key in keys:
            stats = [summary(column, key) for column in loaded]
            best = min(range(len(stats)), key=lambda i: badness(stats[i][0], DIRECTION[key]))
            for i, (value, sd, span) in enumerate(stats):
                cells[i].append(text(value, sd, span, key, i == best))
        lines.append(f"| {label} | " + " | ".join(" / ".join(c) for c in cells) + " |")
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    """The Results table in README's text: the markdown table whose header starts with "| measure | teacher"."""
    lines = readme.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| measure | teacher")), None)
    if start is None:
        raise SystemExit("error: no Results table (a line starting '| measure | teacher') in the README")
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[start:end])


def differences(expected: str, found: str) -> list[str]:
    want, have = expected.splitlines(), found.splitlines()
    out = [f"  README:  {h}\n  JSONs:   {w}" for w, h in zip(want, have) if w != h]
    if len(want) != len(have):
        out.append(f"  README has {len(have)} lines, the JSONs make {len(want)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", type=Path, metavar="README", help="compare with this README's table instead of printing")
    a = p.parse_args(argv)
    table = make_table()
    if a.check is None:
        print(table)
        return 0
    if not a.check.is_file():
        p.error(f"--check {a.check}: no such file")
    diff = differences(table, readme_table(a.check.read_text()))
    if diff:
        print(f"{a.check}'s Results table differs from the JSONs (re-make it: python scripts/readme_table.py):\n"
              + "\n".join(diff))
        return 1
    print(f"{a.check}'s Results table matches the JSONs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
