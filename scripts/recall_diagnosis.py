"""Recall taken apart: is a model's recall lead carried by its off-manifold samples' k-NN balls?

    python scripts/recall_diagnosis.py --model teacher=mnist-teacher --model 1-step=mnist-dmd2-1step ... \
        [--sample-sets 0 1] [--num 5000] [--samples runs/optdiag] [--results results/recall] [--draws 5]

Rows as in scripts/outside_check.py (`LABEL=MODEL`; the first row is the reference, e.g. the teacher; one model a
row). Sample sets as in scripts/optdigits_diagnosis.py (`python -m dmd2 sample --seed <1000 k>`, the images of
`evaluate --seed <1000 k>`, kept in `<samples>` and reused). Per model, set and feature space (the classifier's and
the autoencoder's, the two of `evaluate`; the optdigits reader's beside them), with k = 3 as `evaluate`'s recall,
against the 5,000 real digits: `dmd2.metrics.neighbours.recall_breakdown` (recall, off_manifold = 1 - precision,
recall_on, recall_off_only, radius_ratio), `matched_recall` (m samples drawn from the whole set, radii among them,
the mean over `--draws` draws) and `trimmed_recall` (the same, drawn from the on-manifold samples only); m, per space
and set, is the smallest on-manifold count of any row. Then, per row against the first, in the primary spaces
(classifier, autoencoder) on every set: gap = the first row's recall minus the row's, gap_trim the same on
trimmed_recall, and the verdict on "the first row's recall lead is carried by its off-manifold samples", over the
cells where the row trails (gap > 0; none: "no lead"): supported if gap_trim <= 0 in every such cell, contradicted if
gap_trim >= gap / 2 in every one, mixed otherwise; the matched gap (the smaller count's own effect) is printed
beside each cell, and an overall verdict after the rows. Also per model and space: `recall_by_rarity`, the recall
within each quartile of the real digits ordered by their own k-NN radius, and `rarity_verdict` on "the row loses
the rare digits" (docs/experiments.md states the rule). Each table ends with a descriptive row: one random half of
the real digits against the other (`real_baseline`). Writes `<results>/diagnosis.json` (every value, each draw's
recall too) and `<results>/diagnosis.md` (tables and verdicts), and prints them.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from optdigits_diagnosis import sample_set
from outside_check import checked_rows, fmt, row_parser

from dmd2.metrics.independent import PR_K as K   # evaluate's precision/recall neighbours (3)
from dmd2.sampling import sample_set_seed

ROOT = Path(__file__).resolve().parent.parent
RARITY_BINS = 4                         # quartiles of the real digits by their own k-NN radius (common -> rare)
REAL_SPLIT_SEED = 0                     # the real digits' halves of the descriptive real-against-real row
PRIMARY = ("classifier", "autoencoder")  # the spaces of evaluate's 14 measures
SPACES = PRIMARY + ("optdigits",)
COLUMNS = [("recall", "recall"), ("off_manifold", "off-manifold (1 - precision)"), ("recall_on", "recall, on-manifold balls"),
           ("recall_off_only", "reached only by off-manifold balls"), ("radius_ratio", "k-NN radius / real"),
           ("matched_recall", "recall at m"), ("trimmed_recall", "recall at m, on-manifold only")]


def networks() -> dict:
    """The feature networks of the three spaces (the committed ones)."""
    from dmd2.metrics.independent import default_autoencoder
    from dmd2.metrics.mnist import default_classifier
    from dmd2.metrics.optdigits import default_optdigits_net

    return {"classifier": default_classifier().eval(), "autoencoder": default_autoencoder().eval(),
            "optdigits": default_optdigits_net().eval()}


def features(nets: dict, images) -> dict:
    from dmd2.metrics.independent import embed
    from dmd2.metrics.mnist import _to_tensor

    x = _to_tensor(images)
    return {space: embed(net, x) for space, net in nets.items()}


def diagnose(real: dict, fake: dict[str, dict], draws: int = 5) -> tuple[dict, dict]:
    """real: space -> real features; fake: name -> space -> generated features (one sample set). Returns (values:
    name -> space -> the columns, with each draw's recall in `matched_draws` / `trimmed_draws`; m: space -> the
    common draw count, the smallest on-manifold count of any name)."""
    import numpy as np

    from dmd2.metrics.neighbours import drawn_recall, recall_breakdown, recall_by_rarity, recall_parts

    parts = {name: {s: recall_parts(real[s], f[s], K) for s in real} for name, f in fake.items()}
    values = {name: {s: dict(recall_breakdown(real[s], f[s], K, parts=parts[name][s]),
                             by_rarity=recall_by_rarity(real[s], f[s], K, RARITY_BINS, parts=parts[name][s]))
                     for s in real} for name, f in fake.items()}
    m = {}
    for s in real:
        fewest = min(values, key=lambda name: values[name][s]["on_count"])
        m[s] = values[fewest][s]["on_count"]
        if m[s] <= K:
            raise SystemExit(f"error: {fewest} has {m[s]} on-manifold samples in the {s} space; recall at m needs "
                             f"more than {K}")
    for name, f in fake.items():
        for s in real:
            v = values[name][s]
            v["matched_draws"] = drawn_recall(real[s], f[s], m[s], draws, K)
            v["trimmed_draws"] = drawn_recall(real[s], np.asarray(f[s])[parts[name][s].on], m[s], draws, K)
            v["matched_recall"] = statistics.fmean(v["matched_draws"])
            v["trimmed_recall"] = statistics.fmean(v["trimmed_draws"])
    return values, m


def real_baseline(real: dict) -> dict:
    """Descriptive: per space, `recall_breakdown` of one random half of the real digits against the other (what a
    generator as good as the data would show at half the count)."""
    import numpy as np

    from dmd2.metrics.neighbours import recall_breakdown

    out = {}
    for s, f in real.items():
        order = np.random.default_rng(REAL_SPLIT_SEED).permutation(len(f))
        half = len(f) // 2
        out[s] = recall_breakdown(f[order[:half]], f[order[half:2 * half]], K)
    return out


def verdict(ref: list[dict], row: list[dict]) -> tuple[str, list[tuple[str, int, float, float]]]:
    """ref, row: per sample set, space -> the columns. (verdict, [(space, set index, gap, gap_trim)]) over the
    primary spaces and every set; the rule of the module docstring."""
    cells = [(s, i, r[s]["recall"] - w[s]["recall"], r[s]["trimmed_recall"] - w[s]["trimmed_recall"])
             for i, (r, w) in enumerate(zip(ref, row)) for s in PRIMARY]
    lead = [c for c in cells if c[2] > 0]   # a cell where the row does not trail has no lead to explain
    if not lead:
        return "no lead", cells
    if all(trim <= 0 for _, _, _, trim in lead):
        return "supported", cells
    if all(trim >= gap / 2 for _, _, gap, trim in lead):
        return "contradicted", cells
    return "mixed", cells


def rarity_verdict(ref: list[dict], row: list[dict]) -> tuple[str, list[tuple[str, int, float, float]]]:
    """"The row loses the rare digits" against the reference: (verdict, [(space, set index, the commonest group's
    gap, the rarest group's)]) over the primary spaces and every set; supported if in every cell the rarest gap is
    positive and more than twice the commonest (or the commonest is <= 0), contradicted if in every cell the rarest
    gap is at most the commonest, mixed otherwise."""
    cells = [(s, i, r[s]["by_rarity"][0] - w[s]["by_rarity"][0], r[s]["by_rarity"][-1] - w[s]["by_rarity"][-1])
             for i, (r, w) in enumerate(zip(ref, row)) for s in PRIMARY]
    if all(rare > 0 and (common <= 0 or rare > 2 * common) for _, _, common, rare in cells):
        return "supported", cells
    if all(rare <= common for _, _, common, rare in cells):
        return "contradicted", cells
    return "mixed", cells


def overall(words: dict[str, str]) -> str:
    kinds = set(words.values())
    return kinds.pop() if len(kinds) == 1 else "mixed (" + ", ".join(f"{k}: {v}" for k, v in words.items()) + ")"


def table(done: dict[str, list[dict]], sets: list[int], m: list[dict], real: dict | None = None) -> str:
    """Markdown: per space, each row's columns (the mean over sample sets, the sets' values after it; then the
    real-against-real row of `real_baseline`, if given); then each row's verdict against the first, the matched gap
    (the count's own effect) beside each cell, and the overall verdict."""
    lines = []
    for s in SPACES:
        counts = ", ".join(f"set {k}: {mk[s]}" for k, mk in zip(sets, m))
        lines += [f"**{s}** (m = {counts})", "", "| model | " + " | ".join(n for _, n in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for label, per_set in done.items():
            cols = []
            for key, _ in COLUMNS:
                v = [p[s][key] for p in per_set]
                cols.append(fmt(statistics.fmean(v)) + ("" if len(v) == 1 else f" ({' / '.join(fmt(x) for x in v)})"))
            lines.append(f"| {label} | " + " | ".join(cols) + " |")
        if real is not None:
            lines.append("| real half against real half | " + " | ".join(
                fmt(real[s][key]) if key in real[s] else "-" for key, _ in COLUMNS) + " |")
        bins = len(next(iter(done.values()))[0][s]["by_rarity"])
        lines += ["", f"recall by rarity ({bins} groups of the real digits by their own k-NN radius, commonest first; "
                      "mean over sets)", "", "| model | " + " | ".join(f"group {b + 1}" for b in range(bins)) + " |",
                  "|---" * (bins + 1) + "|"]
        for label, per_set in done.items():
            lines.append(f"| {label} | " + " | ".join(
                fmt(statistics.fmean(p[s]["by_rarity"][b] for p in per_set)) for b in range(bins)) + " |")
        lines.append("")
    first, words = next(iter(done)), {}
    for label, per_set in done.items():
        if label == first:
            continue
        word, cells = verdict(done[first], per_set)
        words[label] = word
        detail = "; ".join(
            f"{s} set {sets[i]}: gap {fmt(g)}, matched {fmt(done[first][i][s]['matched_recall'] - per_set[i][s]['matched_recall'])}, "
            f"trimmed {fmt(t)}" for s, i, g, t in cells)
        lines.append(f"- {label}: {first}'s recall lead carried by its off-manifold samples: **{word}** ({detail})")
    lines.append(f"- overall: **{overall(words)}**")
    rare = {}
    for label, per_set in done.items():
        if label == first:
            continue
        rare[label], cells = rarity_verdict(done[first], per_set)
        detail = "; ".join(f"{s} set {sets[i]}: commonest {fmt(c)}, rarest {fmt(r)}" for s, i, c, r in cells)
        lines.append(f"- {label}: loses the rare digits (gap to {first} by group): **{rare[label]}** ({detail})")
    lines.append(f"- overall: **{overall(rare)}**")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = row_parser(__doc__.splitlines()[0])
    p.set_defaults(results="results/recall")
    p.add_argument("--samples", default="runs/optdiag", help="where the sample sets are kept (npz)")
    p.add_argument("--draws", type=int, default=5, help="draws of m samples for recall at m (default 5)")
    a = p.parse_args(argv)
    if a.draws < 1:
        p.error(f"--draws must be at least 1, got {a.draws}")
    samples = Path(a.samples)
    if samples.exists() and not samples.is_dir():
        p.error(f"--samples {samples}: is a file, not a folder")
    if len(a.model) < 2 or any("," in m.partition("=")[2] for m in a.model):
        p.error("give at least two --model rows of one model each (the first is the reference)")
    rows = checked_rows(p, a, 2 * K + 2, f"recall at m needs more than {K} on-manifold samples")
    if len({models[0] for models in rows.values()}) != len(rows):
        p.error("two --model rows name the same model")
    samples.mkdir(parents=True, exist_ok=True)

    from dmd2.metrics.independent import real_features

    nets = networks()
    real = {s: real_features(net) for s, net in nets.items()}
    done = {label: [] for label in rows}
    common, record = [], {}
    for k in a.sample_sets:
        fake = {label: features(nets, sample_set(samples, models[0], k, a.num)[0]) for label, models in rows.items()}
        values, m = diagnose(real, fake, a.draws)
        common.append(m)
        for label, models in rows.items():
            done[label].append(values[label])
            record[f"{models[0]}-set{k}"] = dict(model=models[0], row=label, sample_set=k, seed=sample_set_seed(k),
                                                 spaces=values[label])
    baseline = real_baseline(real)
    text = table(done, a.sample_sets, common, baseline)
    results = Path(a.results)
    (results / "diagnosis.json").write_text(json.dumps(dict(k=K, draws=a.draws, num=a.num, m=dict(zip(
        map(str, a.sample_sets), common)), real_halves=baseline, sets=record), indent=1) + "\n")
    (results / "diagnosis.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
