"""The teacher-then-student study's table (docs/experiments.md, "Where is the variety lost?"): a hybrid sample
(`evaluate --teacher-until T`) beside its plain student and the teacher, every measure as the mean over sample
sets, and the share of the teacher's recall lead the hybrid wins back:

    g = (hybrid - student) / (teacher - student)     (per feature space; 1: the teacher's recall, 0: the student's)

    python scripts/handover_table.py --hybrid results/handover/4step-last-t749-set0.json,...set1.json \
        --student results/seeds/mnist-4step-last-only-seed0-set0.json,...set1.json \
        --teacher results/teacher-independent-seed0.json,results/teacher-independent-seed1.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seeds import MEASURES, beats, fmt, load_result, mean_over  # noqa: E402

RECALLS = ("classifier_recall", "autoencoder_recall")


def gap_closed(hybrid: float, student: float, teacher: float) -> float:
    """The share of the teacher's lead over the student that the hybrid wins back (undefined without a lead)."""
    if teacher == student:
        raise ValueError("the teacher and the student score the same: no gap to close")
    return (hybrid - student) / (teacher - student)


def table(hybrid: dict, student: dict, teacher: dict) -> str:
    """Rows per measure (hybrid, student, teacher), then g for each recall and the hybrid's wins."""
    lines = ["| measure | hybrid | student | teacher |", "|---|---|---|---|"]
    for key, label, _ in MEASURES:
        if key in hybrid:
            lines.append(f"| {label} | " + " | ".join(fmt(r[key], key) if key in r else "-"
                                                     for r in (hybrid, student, teacher)) + " |")
    for key in RECALLS:
        lines.append(f"\ng ({key.replace('_', ' ')}) = {gap_closed(hybrid[key], student[key], teacher[key]):.2f}")
    for name, ref in (("the student", student), ("the teacher", teacher)):
        wins = [label for key, label, better in MEASURES if key in hybrid and key in ref
                and beats(hybrid[key], ref[key], better)]
        losses = [label for key, label, _ in MEASURES if key in hybrid and key in ref and label not in wins]
        lines.append(f"\nThe hybrid beats {name} on {len(wins)} of {len(wins) + len(losses)} measures"
                     + (f"; not on: {', '.join(losses)}." if losses else " (all)."))
    return "\n".join(lines)


def _files(value: str) -> dict:
    return mean_over([load_result(Path(p)) for p in value.split(",")])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("hybrid", "student", "teacher"):
        p.add_argument(f"--{name}", required=True, help="evaluate JSONs, comma-separated (their mean is used)")
    a = p.parse_args(argv)
    print(table(_files(a.hybrid), _files(a.student), _files(a.teacher)))


if __name__ == "__main__":
    main()
