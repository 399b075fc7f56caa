"""scripts/optdigits_diagnosis.py: where the optdigits reader's FID loss sits (per class, block counts, strokes)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dmd2.metrics.mnist import real_digits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import optdigits_diagnosis as diagnosis  # noqa: E402


def strokes(width, value=255, slant=0.0, n=1) -> np.ndarray:
    """n uint8 28 x 28 images of a 20 px stroke `width` px wide, sheared by `slant` px of x per px of y."""
    img = np.zeros((28, 28), np.uint8)
    for y in range(4, 24):
        x = int(round(12 + slant * (y - 14)))
        img[y, x:x + width] = value
    return np.repeat(img[None], n, 0)


def test_pixel_statistics_read_area_stroke_width_darkness_and_slant():
    widths = [diagnosis.pixel_stats(strokes(w))["stroke"][0] for w in (1, 2, 3, 4)]
    assert widths == sorted(widths) and abs(widths[0] - 1) < 0.1 and abs(widths[3] - 4) < 0.7
    s = diagnosis.pixel_stats(np.concatenate([strokes(2), strokes(2, value=153)]))
    assert s["ink"].tolist() == [40, 40]                      # 153 >= 128: both are ink
    assert s["darkness"][0] == 1.0 and abs(s["darkness"][1] - 0.6) < 1e-9
    lean = [diagnosis.pixel_stats(strokes(2, slant=k))["slant"][0] for k in (-0.4, 0.0, 0.4)]
    assert lean[0] < -0.3 and abs(lean[1]) < 1e-6 and lean[2] > 0.3   # slash, upright, backslash
    empty = diagnosis.pixel_stats(np.zeros((1, 28, 28, 1), np.uint8))
    assert empty["ink"][0] == 0 and empty["stroke"][0] == 0 and empty["darkness"][0] == 0


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


def test_real_digits_against_themselves_have_every_distance_zero_and_mislabelled_digits_only_per_class():
    images, labels = real_digits()
    pick = np.concatenate([np.flatnonzero(labels == c)[:70] for c in range(10)])
    images, labels = images[pick], labels[pick]
    same = diagnosis.diagnose(images, labels, images, labels)
    assert same["fid"] < 1e-6 and same["count_fid"] < 1e-6 and same["class_fid_mean"] < 1e-6
    assert all(same[f"{s}_w1"] == 0 for s in diagnosis.STATS)
    swapped = diagnosis.diagnose(images, (labels + 1) % 10, images, labels)   # the same images asked for other classes
    assert swapped["fid"] < 1e-6 and swapped["count_fid"] < 1e-6 # the whole set is unchanged
    assert swapped["class_fid_mean"] > 1.0                      # each class holds another class's shapes
    with pytest.raises(ValueError, match="700 images but 699 labels"):
        diagnosis.diagnose(images, labels[:699], images, labels)


def sets(fid, class_fid):
    row = {k: fid for k, _ in diagnosis.COLUMNS}
    return dict(row, fid=fid, class_fid=class_fid, class_fid_mean=float(np.mean(class_fid)))


def test_the_table_gives_means_over_sets_and_seeds_and_counts_lost_classes():
    rows = {"teacher": [[sets(1.0, [1.0, 1.0, 1.0]), sets(2.0, [1.0, 3.0, 1.0])]],        # per class 1, 2, 1
            "student": [[sets(3.0, [2.0, 1.0, 0.5])], [sets(5.0, [2.0, 3.0, 2.0])]]}     # 1 and 3 classes above
    text = diagnosis.table(rows, {f"{s}_mean": 1.0 for s in diagnosis.STATS})
    teacher = next(line for line in text.splitlines() if line.startswith("| teacher"))
    assert teacher.startswith("| teacher | 1 | 1.500 | ")
    student = next(line for line in text.splitlines() if line.startswith("| student"))
    assert student.startswith("| student | 2 | 4.000 ± 1.414 | ")
    assert "| real digits | - | 0 | 0 | 0 | 1.000 | 0 |" in text
    assert "- student: per-class FID above teacher's in 1 / 3 of 3 classes (per seed)" in text


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
    diagnosis.samples_path(tmp_path / "s", one, 0).write_bytes(b"not an npz")
    diagnosis.main(argv)
    assert capsys.readouterr().out.count("-m dmd2 sample") == 1       # a broken file is sampled again


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
