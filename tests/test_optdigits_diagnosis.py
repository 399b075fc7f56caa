"""scripts/optdigits_diagnosis.py: where the optdigits reader's FID loss sits (per class, block counts, strokes)."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dmd2.metrics.mnist import real_digits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import optdigits_diagnosis as diagnosis  # noqa: E402


def strokes(width, value=255, angle=0.0, n=1, length=20) -> np.ndarray:
    """n uint8 32 x 32 images of a straight stroke `width` px wide and `length` long, `angle` radians from upright
    (positive: its bottom to the right, a backslash)."""
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    u = (xx - 16.01) * np.cos(angle) - (yy - 16.01) * np.sin(angle)   # across the stroke
    v = (xx - 16.01) * np.sin(angle) + (yy - 16.01) * np.cos(angle)   # along it
    img = np.where((np.abs(u) < width / 2) & (np.abs(v) < length / 2), value, 0).astype(np.uint8)
    return np.repeat(img[None], n, 0)


def test_pixel_statistics_read_area_stroke_width_at_any_angle_darkness_and_slant():
    for w in (1, 2, 3, 4):
        for angle in np.linspace(0, np.pi / 2, 9):                # upright, leaning or flat alike
            s = diagnosis.pixel_stats(strokes(w, angle=angle))
            drawn = s["ink"][0] / 20                              # the rasterised stroke's width
            rectangle = 2 * s["ink"][0] / (2 * 20 + 2 * drawn)    # 2 area / perimeter of a drawn x 20 rectangle
            if w > 1:
                assert abs(s["stroke"][0] / rectangle - 1) < 0.09, (w, angle)
            else:                                                # a 1 px diagonal: pixels touching at corners
                assert 0.9 < s["stroke"][0] < 1.16, angle
    side_count = 2 * 60 / (np.abs(np.diff(np.pad(strokes(3, angle=np.pi / 4)[0] > 0, 1), axis=0)).sum()
                           + np.abs(np.diff(np.pad(strokes(3, angle=np.pi / 4)[0] > 0, 1), axis=1)).sum())
    assert side_count < 0.8 * diagnosis.pixel_stats(strokes(3, angle=np.pi / 4))["stroke"][0]  # what it corrects
    s = diagnosis.pixel_stats(np.concatenate([strokes(2), strokes(2, value=153)]))
    assert s["ink"].tolist() == [40, 40]                      # 153 >= 128: both are ink
    assert s["darkness"][0] == 1.0 and abs(s["darkness"][1] - 0.6) < 1e-9
    lean = [diagnosis.pixel_stats(strokes(2, angle=a))["slant"][0] for a in (-0.4, 0.0, 0.4)]
    assert lean[0] == pytest.approx(-np.tan(0.4), abs=0.05) and abs(lean[1]) < 1e-6   # a slash, upright,
    assert lean[2] == pytest.approx(np.tan(0.4), abs=0.05)                           # a backslash
    empty = diagnosis.pixel_stats(np.zeros((1, 28, 28, 1), np.uint8))
    assert empty["ink"][0] == 0 and empty["stroke"][0] == 0 and empty["darkness"][0] == 0


def test_a_disc_perimeter_and_distances_between_distributions_not_between_means():
    yy, xx = np.mgrid[0:60, 0:60]
    disc = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 20 ** 2)[None]
    assert diagnosis.crofton_perimeter(disc)[0] == pytest.approx(2 * np.pi * 20, rel=0.02)
    fake = np.concatenate([strokes(1, n=5), strokes(3, n=5)])    # ink 20 and 60: mean 40
    real = strokes(2, n=10)                                      # ink 40 every time
    d = diagnosis.stat_distances(fake, real)
    assert d["ink_mean"] == 40 and d["ink_w1"] == pytest.approx(20)   # equal means, distributions 20 apart
    assert diagnosis.stat_distances(real, real)["ink_w1"] == 0


def test_per_class_fid_is_zero_for_a_set_against_itself_and_names_the_class_that_differs():
    rng = np.random.default_rng(0)
    real, labels = rng.normal(size=(400, 3)), np.repeat(np.arange(4), 100)      # 3-d: 4 samples a class suffice
    assert np.allclose(diagnosis.class_fids(real, labels, real, labels), 0, atol=1e-8)
    fake = real.copy()
    fake[labels == 2] += 3.0                                  # class 2's samples are shifted, the rest exact
    fids = diagnosis.class_fids(fake, labels, real, labels)
    assert fids[2] == pytest.approx(27.0, rel=1e-6) and max(fids[:2] + fids[3:]) < 1e-8
    with pytest.raises(ValueError, match="class 3: 3 samples; every class needs at least 4"):
        diagnosis.class_fids(real[:303], labels[:303], real, labels)


def test_count_spread_is_the_mean_within_class_total_variance():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
    labels = np.array([0, 0, 1, 1])
    assert diagnosis.class_spread(x, labels) == pytest.approx((2.0 + 8.0) / 2)   # class 0: var 2; class 1: var 8


def test_real_digits_against_themselves_have_every_distance_zero_and_mislabelled_digits_only_per_class():
    images, labels = real_digits()
    pick = np.concatenate([np.flatnonzero(labels == c)[:70] for c in range(10)])
    images, labels = images[pick], labels[pick]
    same = diagnosis.diagnose(images, labels, images, labels)
    assert same["fid"] < 1e-6 and same["count_fid"] < 1e-6 and same["class_fid_mean"] < 1e-6
    assert same["count_spread"] == pytest.approx(1.0)
    assert all(same[f"{s}_w1"] == 0 for s in diagnosis.STATS)
    swapped = diagnosis.diagnose(images, (labels + 1) % 10, images, labels)   # the same images asked for other classes
    assert swapped["fid"] < 1e-6 and swapped["count_fid"] < 1e-6 # the whole set is unchanged
    assert swapped["class_fid_mean"] > 1.0                      # each class holds another class's shapes
    from dmd2.metrics.frechet import feature_stats, frechet_distance
    from dmd2.metrics.optdigits import to_optdigits

    half = diagnosis.diagnose(images[::2], labels[::2] * 0, images[1::2], labels[1::2] * 0)  # one class, two halves
    raw = frechet_distance(*feature_stats(to_optdigits(images[::2]).double().numpy()),
                           *feature_stats(to_optdigits(images[1::2]).double().numpy()))
    assert half["count_fid"] > 0 and half["count_fid"] == pytest.approx(raw / 256, rel=1e-6)   # counts / 16
    with pytest.raises(ValueError, match="700 images but 699 labels"):
        diagnosis.diagnose(images, labels[:699], images, labels)


def sets(base, class_fid):
    """One sample set's result: every column a distinct value (base + its index / 10), class_fid as given."""
    row = {k: base + i / 10 for i, (k, _) in enumerate(diagnosis.COLUMNS)}
    return dict(row, class_fid=class_fid)


def test_the_table_gives_means_over_sets_and_seeds_and_what_every_seed_wins_or_loses():
    rows = {"teacher": [[sets(1.0, [1.0, 1.0, 1.0]), sets(2.0, [1.0, 3.0, 1.0])]],        # per class 1, 2, 1
            "student": [[sets(3.0, [2.0, 1.0, 0.5])], [sets(5.0, [2.0, 3.0, 2.0])]]}     # 1 and 3 classes above
    rows["student"][0][0]["stroke_w1"] = 0.0                     # closer than the teacher for seed 0 only
    rows["student"][0][0]["slant_w1"] = rows["student"][1][0]["slant_w1"] = 0.0   # closer for every seed
    text = diagnosis.table(rows, {f"{s}_mean": 1.0 for s in diagnosis.STATS})
    teacher = next(line for line in text.splitlines() if line.startswith("| teacher"))
    assert teacher.startswith("| teacher | 1 | 1.500 | 1.600 | 1.700 | 1.800 | ")   # FID, per-class, count, spread
    student = next(line for line in text.splitlines() if line.startswith("| student"))
    assert student.startswith("| student | 2 | 4.000 ± 1.414 | 4.100 ± 1.414 | ")
    assert "| real digits | - | 0 | 0 | 0 | 1 | 1.000 | 0 |" in text
    line = next(line for line in text.splitlines() if line.startswith("- student"))
    assert line.startswith("- student against teacher: every seed farther from the real digits on FID, per-class FID "
                           "(mean of 10), count FID, ink W1, darkness W1; every seed closer on slant W1; ")
    assert "stroke" not in line and "spread)" not in line.split(";")[0]
    assert line.endswith("per-class FID above teacher's in 1 / 3 of 3 classes (per seed); every seed more varied "
                         "within classes (count spread)")


def test_samples_are_made_once_and_the_results_name_the_instrument(tmp_path, capsys):
    from conftest import make_tiny_students

    from dmd2.metrics.optdigits import instrument_id

    one = make_tiny_students(tmp_path)[0]
    argv = ["--model", f"a={one}", "--num", "650", "--sample-sets", "0", "1", "--samples", str(tmp_path / "s"),
            "--results", str(tmp_path / "r")]
    diagnosis.main(argv)
    out = capsys.readouterr().out
    assert out.count("-m dmd2 sample") == 2 and "--seed 1000" in out
    saved = json.loads((tmp_path / "r" / "diagnosis.json").read_text())
    assert saved["instrument"] == instrument_id() and len(saved["sets"]) == 2
    assert {"fid", "class_fid", "count_fid", "stroke_w1"} <= set(saved["sets"][f"{one}-set1"])
    assert (tmp_path / "r" / "diagnosis.md").read_text().strip() in out
    with np.load(diagnosis.samples_path(tmp_path / "s", one, 0)) as held:
        assert len(held["images"]) == 650
    diagnosis.main(argv)
    assert "-m dmd2 sample" not in capsys.readouterr().out            # reused, not sampled again
    path = diagnosis.samples_path(tmp_path / "s", one, 0)
    assert diagnosis.load_samples(path, one, 0, 650) is not None
    assert diagnosis.load_samples(path, one, 1000, 650) is None     # another seed's
    assert diagnosis.load_samples(path, "mnist-teacher", 0, 650) is None   # another model's
    assert diagnosis.load_samples(path, one, 0, 700) is None        # another count
    with np.load(path) as held:
        kept = {k: held[k] for k in ("images", "labels", "model", "seed")}
    for options, why in (('{"teacher_until": 249}', "handed over from the teacher"), (None, "options not recorded")):
        other = tmp_path / "other.npz"
        np.savez(other, **kept, **({} if options is None else {"options": np.array(options)}))
        assert diagnosis.load_samples(other, one, 0, 650) is None, why
    old = path.stat().st_mtime - 1000
    os.utime(path, (old, old))                                       # older than the student's weights
    assert diagnosis.load_samples(path, one, 0, 650) is None
    path.write_bytes(path.read_bytes()[:500])                        # truncated, as a killed run could leave it
    assert diagnosis.load_samples(path, one, 0, 650) is None
    diagnosis.main(argv)
    assert capsys.readouterr().out.count("-m dmd2 sample") == 1       # the broken file is sampled again


def test_bad_arguments_are_refused_naming_them(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for argv, message in ((["--model", "a=x", "--model", "a=y"], "share a label"),
                          (["--model", "a=mnist-teacher", "--num", "649"], "--num must be at least 650"),
                          (["--model", "a=mnist-teacher", "--sample-sets", "1", "1"], "--sample-sets must be distinct"),
                          (["--model", f"a={tmp_path / 'nowhere'}"], "no such model"),
                          (["--model", "a=mnist-teacher", "--samples", str(tmp_path / "file")], "is a file"),
                          (["--model", "a"], "expected LABEL=MODEL")):
        with pytest.raises(SystemExit) as stop:
            diagnosis.main(argv + ["--results", str(tmp_path / "r")])
        assert message in capsys.readouterr().err + str(stop.value.code)
