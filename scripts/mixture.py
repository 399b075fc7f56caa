"""Do two students miss the same real digits, and does drawing each sample from one of them (a mixture) reach more?

    python scripts/mixture.py A=runs/timing/fast-seed0-avx512/student B=runs/mix/fast-seed1/student \
        [--sample-sets 0 1] [--num 5000] [--samples runs/mix] [--out results/mixture] [--name seeds]

Each student's sample set k (`python -m dmd2 sample --seed <1000 k>`, kept as an npz under --samples and reused
as the diagnoses do) is embedded in the classifier's and the autoencoder's feature spaces. A real digit is missed
by a sample set when it lies outside every sample's k-NN ball (k = 3, recall's own test).

- Shared misses (docs/experiments.md "Do two seeds miss the same real digits?"): o_self, the share of a student's
  set-k misses that its own other set misses too (mean over both students and both k); o_cross, the share of A's set-k misses
  that B's other set misses (mean over k); o_0, the miss rate of B's sets (what independent misses give);
  s = (o_cross - o_0) / (o_self - o_0). Verdict per the plan: "the preset's misses" if s >= 0.8 in both spaces,
  "each seed's own" if s <= 0.5 in both, else "partly shared".
- The mixture M: A's samples 0 .. n/2 - 1 and B's n/2 .. n - 1 of each set (each half whole class-balanced
  batches; no starting noise used twice), scored with all 14 measures of `evaluate`. Verdict: "lifts" if M's
  recall (mean over the sets) exceeds the mean of A's and B's by >= 0.02 in both spaces, "no lift" if by < 0.01 in
  both, else "inconclusive".

Writes `<out>/<name>-{A,B,mixture}-set<k>.json` (evaluate's keys; A's and B's rescored from the same npz files, so
they can be checked against their `evaluate` JSONs) and `<out>/<name>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optdigits_diagnosis import sample_set  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPACES = ("classifier", "autoencoder")
BATCH = 250                # `generate_many`'s batch: one class-balanced block of labels


def missed(real: np.ndarray, fake: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per real feature vector: True where no fake sample's k-NN ball reaches it (1 - recall, per digit; k: recall's
    own, `dmd2.metrics.independent.PR_K`, unless given)."""
    from dmd2.metrics.independent import PR_K
    from dmd2.metrics.neighbours import recall_parts

    return ~recall_parts(real, fake, PR_K if k is None else k).reached


def shared_share(first: np.ndarray, second: np.ndarray) -> float:
    """The share of `first`'s misses that `second` misses too (nan when `first` misses nothing)."""
    return float((first & second).sum() / first.sum()) if first.any() else float("nan")


def repeat_share(o_self: float, o_cross: float, o_0: float) -> float:
    """s = (o_cross - o_0) / (o_self - o_0): how much of one network's own repeatability another keeps (nan when
    the network's misses repeat no more than independent ones would)."""
    return (o_cross - o_0) / (o_self - o_0) if o_self > o_0 else float("nan")


def shared_verdict(s: dict[str, float]) -> str:
    values = [round(v, 9) for v in s.values()]
    if any(np.isnan(v) for v in values):
        return "undefined (a student's misses repeat no more than chance)"
    if all(v >= 0.8 for v in values):
        return "the preset's misses"
    if all(v <= 0.5 for v in values):
        return "each seed's own"
    return "partly shared"


def mixture_verdict(gain: dict[str, float]) -> str:
    values = [round(v, 9) for v in gain.values()]   # recalls are multiples of 1/n: 0.82 - 0.80 is 0.02, not 0.0199..
    if all(v >= 0.02 for v in values):
        return "lifts"
    if all(v < 0.01 for v in values):
        return "no lift"
    return "inconclusive"


def mix(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The first half of `first`'s (images, labels) and the second half of `second`'s: whole batches of BATCH
    from each, so both halves are class-balanced and no starting noise appears twice."""
    (a, la), (b, lb) = first, second
    n = len(a)
    if len(b) != n or n % (2 * BATCH):
        raise ValueError(f"a mixture needs two sample sets of one size, a multiple of {2 * BATCH}: got {n} and {len(b)}")
    if not np.array_equal(la, lb):
        raise ValueError("the two sample sets' labels differ: they were not drawn by `sample` with the same count")
    half = n // 2
    return np.concatenate([a[:half], b[half:]]), np.concatenate([la[:half], lb[half:]])


def score(images: np.ndarray, labels: np.ndarray, nets: dict) -> dict:
    """All 14 measures of `python -m dmd2 evaluate` (its JSON keys) for these images."""
    from dmd2.metrics.independent import evaluate_independent
    from dmd2.metrics.mnist import evaluate_images

    return {**evaluate_images(images, labels, nets["classifier"]),
            **evaluate_independent(images, nets["classifier"], nets["autoencoder"])}


def analyse(sets: dict[str, list[tuple[np.ndarray, np.ndarray]]], nets: dict) -> dict:
    """sets: "A" / "B" -> [(images, labels) per sample set] (two sets). Returns the shared-miss numbers and
    verdict, every row's scores per set, the recall gains and the mixture's verdict."""
    from dmd2.metrics.independent import embed, real_features
    from dmd2.metrics.mnist import _to_tensor

    if sorted(sets) != ["A", "B"] or any(len(v) != 2 for v in sets.values()):
        raise ValueError("need students A and B with two sample sets each")
    rows = {"A": sets["A"], "B": sets["B"], "mixture": [mix(a, b) for a, b in zip(sets["A"], sets["B"])]}
    scores = {row: [score(images, labels, nets) for images, labels in held] for row, held in rows.items()}
    shared = {}
    for space in SPACES:
        real = real_features(nets[space])
        miss = {row: [missed(real, embed(nets[space], _to_tensor(images))) for images, _ in held]
                for row, held in sets.items()}
        o_self = statistics.fmean(shared_share(m[k], m[1 - k]) for m in miss.values() for k in (0, 1))
        o_cross = statistics.fmean(shared_share(miss["A"][k], miss["B"][1 - k]) for k in (0, 1))
        o_0 = statistics.fmean(float(m.mean()) for m in miss["B"])
        # the plan's direction is A's misses in B's sets; the other direction (B's in A's, A's miss rate as the
        # chance level) is kept beside it, described only
        o_cross_b = statistics.fmean(shared_share(miss["B"][k], miss["A"][1 - k]) for k in (0, 1))
        o_0_b = statistics.fmean(float(m.mean()) for m in miss["A"])
        shared[space] = dict(o_self=o_self, o_cross=o_cross, o_0=o_0, s=repeat_share(o_self, o_cross, o_0),
                             o_cross_b_to_a=o_cross_b, s_b_to_a=repeat_share(o_self, o_cross_b, o_0_b),
                             miss_rates={row: [float(x.mean()) for x in m] for row, m in miss.items()})
        # the misses are recall's own test: 1 - each set's miss rate is the recall its scores report
        shared[space]["recall_mismatch"] = max(abs(1 - rate - scores[row][k][f"{space}_recall"])
                                               for row, rates in shared[space]["miss_rates"].items()
                                               for k, rate in enumerate(rates))
    recall = {row: {space: statistics.fmean(r[f"{space}_recall"] for r in results) for space in SPACES}
              for row, results in scores.items()}
    gain = {space: recall["mixture"][space] - (recall["A"][space] + recall["B"][space]) / 2 for space in SPACES}
    return dict(shared=shared, shared_verdict=shared_verdict({s: shared[s]["s"] for s in SPACES}),
                scores=scores, recall=recall, gain=gain, mixture_verdict=mixture_verdict(gain))


def no_nan(value):
    """NaN (an undefined share) as null, so the JSON stays strict."""
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def table(result: dict, models: dict[str, str]) -> str:
    lines = [f"A = `{models['A']}`, B = `{models['B']}`; mixture = A's first half and B's second half of each set.", "",
             "| space | o_self | o_cross | o_0 | s | recall A | recall B | recall mixture | gain |", "|---|---|---|---|---|---|---|---|---|"]
    for space in SPACES:
        sh, rc = result["shared"][space], result["recall"]
        lines.append(f"| {space} | {sh['o_self']:.3f} | {sh['o_cross']:.3f} | {sh['o_0']:.3f} | {sh['s']:.2f} | "
                     f"{rc['A'][space]:.3f} | {rc['B'][space]:.3f} | {rc['mixture'][space]:.3f} | {result['gain'][space]:+.3f} |")
    lines += ["", f"Shared misses: **{result['shared_verdict']}** (s >= 0.8 in both spaces: the preset's misses; "
              "<= 0.5 in both: each seed's own).",
              f"Mixture: **{result['mixture_verdict']}** (gain >= 0.02 in both spaces: lifts; < 0.01 in both: no lift)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("students", nargs=2, help="A=MODEL B=MODEL (a registry name or a student folder)")
    p.add_argument("--sample-sets", type=int, nargs=2, default=[0, 1], metavar="K")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--samples", type=Path, default=ROOT / "runs" / "mix")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "mixture")
    p.add_argument("--name", default="mixture")
    a = p.parse_args(argv)
    models = {}
    for text in a.students:
        name, sep, model = (part.strip() for part in text.partition("="))
        if not sep or name not in ("A", "B") or not model or name in models:
            p.error(f"{text!r}: name the two students A=MODEL and B=MODEL (a registry name or a student folder)")
        models[name] = model
    if a.num < 2 * BATCH or a.num % (2 * BATCH):
        p.error(f"--num must be a positive multiple of {2 * BATCH} (two halves of whole batches), got {a.num}")
    if a.sample_sets[0] == a.sample_sets[1]:
        p.error(f"--sample-sets must be two different sets, got {a.sample_sets[0]} twice")

    if min(a.sample_sets) < 0:
        p.error(f"--sample-sets must be >= 0, got {a.sample_sets}")

    from dmd2.metrics.independent import default_autoencoder
    from dmd2.metrics.mnist import default_classifier
    from dmd2.sampling import sample_set_seed

    # the networks and the output folder first, so a missing network or an unwritable folder fails before sampling
    nets = {"classifier": default_classifier().eval(), "autoencoder": default_autoencoder().eval()}
    try:
        a.out.mkdir(parents=True, exist_ok=True)
        a.samples.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"cannot write the results or samples folder: {e}")
    sets = {name: [sample_set(a.samples, model, k, a.num) for k in a.sample_sets] for name, model in models.items()}
    result = analyse(sets, nets)
    for row, results in result.pop("scores").items():
        for k, values in zip(a.sample_sets, results):
            meta = dict(rows=models if row == "mixture" else models[row], sample_set=k, seed=sample_set_seed(k),
                        num=a.num)   # `seed` as evaluate's JSON has it (scripts/compare.py checks the sets differ)
            (a.out / f"{a.name}-{row}-set{k}.json").write_text(json.dumps({**values, **meta}, indent=1) + "\n")
    summary = dict(models=models, sample_sets=a.sample_sets, **result)
    (a.out / f"{a.name}.json").write_text(json.dumps(no_nan(summary), indent=1) + "\n")
    text = table(result, models)
    (a.out / f"{a.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
