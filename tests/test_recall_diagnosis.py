"""Recall taken apart (dmd2.metrics.neighbours.recall_breakdown, drawn_recall) and scripts/recall_diagnosis.py."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dmd2.metrics.mnist import real_digits
from dmd2.metrics.neighbours import drawn_recall, on_manifold, precision_recall, recall_breakdown, recall_by_rarity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import recall_diagnosis as diagnosis  # noqa: E402

REAL = np.arange(10.0)[:, None]                       # 0..9 on a line; k = 3 radii: 3 at the ends, 2 inside
FAKE = np.array([0.1, 0.2, 0.3, 0.4, 20.0])[:, None]  # four samples by the real 0, one outlier far off


def test_an_outliers_wide_ball_carries_the_recall_hand_computed():
    b = recall_breakdown(REAL, FAKE, k=3)
    # the outlier's 3rd neighbour is 0.2 at 19.8, so its ball reaches every real point above 0.2 (1..9);
    # the four near 0 have radii 0.3, 0.2, 0.2, 0.3 and only 0.1's ball (open) holds the real 0
    assert b["recall"] == 1.0 and b["recall_on"] == pytest.approx(0.1)
    assert b["recall_off_only"] == pytest.approx(0.9) and b["off_manifold"] == pytest.approx(0.2)
    assert b["on_count"] == 4 and b["radius_ratio"] == pytest.approx(0.3 / 2)   # medians 0.3 and 2
    assert (1 - b["off_manifold"], b["recall"]) == pytest.approx(precision_recall(REAL, FAKE, k=3))
    assert on_manifold(REAL, FAKE, k=3).tolist() == [True, True, True, True, False]
    assert drawn_recall(REAL, FAKE, 5, draws=3) == [1.0, 1.0, 1.0]     # all five drawn: the plain recall
    assert drawn_recall(REAL, FAKE[:4], 4) == [pytest.approx(0.1)] * 5   # the on-manifold four


def test_a_set_against_itself_and_a_collapsed_set():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    same = recall_breakdown(real, real)
    assert same["recall"] == same["recall_on"] == 1.0 and same["off_manifold"] == 0.0
    assert same["recall_off_only"] == 0.0 and same["radius_ratio"] == 1.0
    collapsed = recall_breakdown(real, real[:1] + 0.01 * rng.normal(size=(40, 8)))   # near copies of one point
    assert collapsed["off_manifold"] == 0.0 and collapsed["recall"] < 0.02
    assert collapsed["recall_off_only"] == 0.0 and collapsed["radius_ratio"] < 0.1
    sparse = recall_breakdown(real, real[:40])   # a tenth of the set: wide balls reach most of the rest
    assert sparse["recall"] > 0.5 and sparse["radius_ratio"] > 1.3 and sparse["off_manifold"] == 0.0
    lone = recall_breakdown(real, np.concatenate([real[:1], real[:1] + 50, real[:1] + 60]), k=1)
    assert lone["on_count"] == 1 and lone["recall_on"] > 0       # one on-manifold centre still counts


def brute_recall(real, drawn, k=3):
    """Recall of 1-d `drawn` against 1-d `real`, radii among `drawn`, by loops (no library code)."""
    radii = [sorted(abs(d - e) for j, e in enumerate(drawn) if j != i)[k - 1] for i, d in enumerate(drawn)]
    return sum(any(abs(x - d) < r for d, r in zip(drawn, radii)) for x in real) / len(real)


def test_drawn_recall_takes_radii_among_the_drawn_samples_hand_checked():
    fake = np.array([0.1, 0.2, 0.3, 0.4, 5.0, 9.0])
    got = drawn_recall(REAL, fake[:, None], 4, draws=6, k=1, seed=5)
    whole = dict(zip(fake, [sorted(abs(d - e) for e in fake if e != d)[0] for d in fake]))  # radii among all six
    differs = 0
    for d in range(6):
        drawn = fake[np.random.default_rng(5 + d).choice(6, 4, replace=False)]
        assert got[d] == pytest.approx(brute_recall(REAL[:, 0], drawn, k=1))
        differs += got[d] != pytest.approx(sum(any(abs(x - c) < whole[c] for c in drawn) for x in REAL[:, 0]) / 10)
    assert len(set(got)) > 1 and differs   # the draws differ, and radii among the whole six give other values


def test_drawn_recall_is_seeded_and_names_a_bad_count():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
    a = drawn_recall(real, fake, 100, draws=4, seed=7)
    assert a == drawn_recall(real, fake, 100, draws=4, seed=7) and len(set(a)) > 1   # draws differ, seeded
    assert drawn_recall(real, fake, 100, draws=2, seed=8) == a[1:3]                  # draw d uses seed + d
    for m in (3, 301):
        with pytest.raises(ValueError, match=f"m={m}"):
            drawn_recall(real, fake, m)


def cells(recall, trimmed):
    return {s: dict(recall=recall, trimmed_recall=trimmed) for s in diagnosis.PRIMARY}


def test_the_verdict_rule():
    teacher = [cells(0.88, 0.80), cells(0.88, 0.80)]
    assert diagnosis.verdict(teacher, [cells(0.85, 0.81)] * 2)[0] == "supported"     # gap 0.03, trimmed -0.01
    assert diagnosis.verdict(teacher, [cells(0.85, 0.785)] * 2)[0] == "contradicted"  # trimmed 0.015 = gap / 2
    assert diagnosis.verdict(teacher, [cells(0.85, 0.79)] * 2)[0] == "mixed"          # 0.01: between
    mixed = [cells(0.85, 0.81), cells(0.85, 0.70)]                                    # one set each way
    word, detail = diagnosis.verdict(teacher, mixed)
    assert word == "mixed" and len(detail) == 4 and {d[0] for d in detail} == set(diagnosis.PRIMARY)
    assert diagnosis.verdict(teacher, [cells(0.90, 0.70)] * 2)[0] == "no lead"     # it does not trail anywhere
    ahead_once = [cells(0.90, 0.70), cells(0.85, 0.81)]                             # the trailing set decides
    assert diagnosis.verdict(teacher, ahead_once)[0] == "supported"


def test_diagnose_draws_m_from_the_on_manifold_samples_at_the_smallest_on_manifold_count():
    rng = np.random.default_rng(3)
    real = {s: rng.normal(size=(300, 2)) for s in diagnosis.SPACES}
    near = {s: rng.normal(size=(300, 2)) for s in real}
    far = {s: np.concatenate([rng.normal(size=(240, 2)), rng.uniform(4, 9, size=(60, 2))]) for s in real}
    values, m = diagnosis.diagnose(real, {"near": near, "far": far}, draws=3)
    for s in real:
        assert m[s] == min(values["near"][s]["on_count"], values["far"][s]["on_count"]) == values["far"][s]["on_count"]
        assert 200 < m[s] < 300 and values["far"][s]["off_manifold"] > 0.15
        on = on_manifold(real[s], far[s])
        assert values["far"][s]["trimmed_draws"] == drawn_recall(real[s], far[s][on], m[s], 3)
        assert values["far"][s]["matched_draws"] == drawn_recall(real[s], far[s], m[s], 3)
        assert values["near"][s]["matched_draws"] == drawn_recall(real[s], near[s], m[s], 3)
        assert values["far"][s]["matched_recall"] != values["far"][s]["trimmed_recall"]
    text = diagnosis.table({"near": [values["near"]], "far": [values["far"]]}, [0], [m], diagnosis.real_baseline(real))
    assert "- far: near's recall lead" in text and "- overall: **" in text
    assert text.count("| real half against real half |") == len(diagnosis.SPACES)


def write_set(folder, model, k, images, labels):
    from outside_check import result_path
    from dmd2.sampling import sample_set_seed

    np.savez(result_path(folder, model, k, ".npz"), images=images, labels=labels, model=np.str_(model),
             seed=np.int64(sample_set_seed(k)), options=np.array("{}"))


def test_the_script_end_to_end_on_kept_sample_sets(tmp_path):
    images, labels = real_digits()
    rng = np.random.default_rng(0)
    samples = tmp_path / "samples"
    samples.mkdir()
    for k in (0, 1):
        varied = rng.choice(len(images), 60, replace=False)
        write_set(samples, "mnist-teacher", k, images[varied], labels[varied])          # varied digits
        narrow = np.repeat(rng.choice(np.flatnonzero(labels == 1), 6, replace=False), 10)
        write_set(samples, "mnist-dmd2-1step", k, images[narrow], labels[narrow])       # six ones, ten times each
    out = tmp_path / "out"
    diagnosis.main(["--model", "teacher=mnist-teacher", "--model", "narrow=mnist-dmd2-1step", "--num", "60",
                    "--samples", str(samples), "--results", str(out), "--draws", "2"])
    record = json.loads((out / "diagnosis.json").read_text())
    assert record["k"] == 3 and record["draws"] == 2 and set(record["m"]) == {"0", "1"}
    narrow = record["sets"]["mnist-dmd2-1step-set0"]["spaces"]
    teacher = record["sets"]["mnist-teacher-set0"]["spaces"]
    for s in diagnosis.SPACES:
        assert narrow[s]["recall"] < teacher[s]["recall"]        # six digits reach fewer real ones
        assert 3 < record["m"]["0"][s] <= 60
    text = (out / "diagnosis.md").read_text()
    assert "**classifier**" in text and "**optdigits**" in text and "- narrow: teacher's recall lead" in text


def test_bad_arguments_are_named(tmp_path, capsys):
    base = ["--model", "teacher=mnist-teacher", "--results", str(tmp_path / "r"), "--samples", str(tmp_path / "s")]
    for extra, words in ((["--draws", "0"], "--draws must be at least 1"),
                         ([], "at least two --model rows"),
                         (["--model", "x=mnist-dmd2-1step,mnist-dmd2-2step"], "one model each"),
                         (["--model", "y=no-such-model"], "no such model"),
                         (["--model", "z=mnist-dmd2-1step", "--num", "5"], "--num must be at least 8")):
        with pytest.raises(SystemExit):
            diagnosis.main(base + extra)
        assert words in capsys.readouterr().err


def test_recall_by_rarity_finds_a_generator_that_drops_the_tails():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(800, 2))
    assert recall_by_rarity(real, real) == [1.0] * 4
    core = rng.normal(size=(800, 2)) * 0.5                  # the data's centre only: the tails go unreached
    groups = recall_by_rarity(real, core)
    assert groups[0] > 0.9 and groups[-1] < 0.5 and groups == sorted(groups, reverse=True)
    line = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [20.0], [40.0], [41.0]])   # hand-checked: k = 1
    # real 1-NN radii: 1 1 1 1 7 10 1 1 -> commonest group (4 of the radius-1 digits, stable order) = 0, 1, 2, 3
    assert recall_by_rarity(line, line[:4] + 0.1, k=1, bins=2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="bins"):
        recall_by_rarity(real, core, bins=0)


def test_the_rarity_verdict_rule():
    def at(common, rare):
        return {s: dict(by_rarity=[common, 0.9, rare]) for s in diagnosis.PRIMARY}
    teacher = [at(0.95, 0.80)] * 2
    assert diagnosis.rarity_verdict(teacher, [at(0.94, 0.70)] * 2)[0] == "supported"      # 0.01 common, 0.10 rare
    assert diagnosis.rarity_verdict(teacher, [at(0.96, 0.78)] * 2)[0] == "supported"      # common gap <= 0
    assert diagnosis.rarity_verdict(teacher, [at(0.90, 0.76)] * 2)[0] == "contradicted"   # 0.05 common, 0.04 rare
    assert diagnosis.rarity_verdict(teacher, [at(0.94, 0.785)] * 2)[0] == "mixed"         # 0.01, 0.015: not twice
