"""scripts/compare.py: models side by side on every measure, and where every sample set beats the reference."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import compare  # noqa: E402


def write(tmp_path, name, **values):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_cells_are_means_with_the_range_of_the_sample_sets():
    assert compare.cell([7.0, 8.0], "fid") == "7.50 (7.00-8.00)"
    assert compare.cell([17.4519], "autoencoder_kid") == "17.45"      # as evaluate writes it
    assert compare.cell([0.9], "alignment") == "0.900"


def test_a_measure_is_won_only_when_every_sample_set_beats_the_references_mean(tmp_path, capsys):
    teacher = write(tmp_path, "t", fid=8.0, alignment=0.96, autoencoder_fid=17.0, diversity_ratio=1.0,
                    classifier_density=0.7)
    a = write(tmp_path, "a0", seed=0, fid=7.0, alignment=0.97, autoencoder_fid=16.0, diversity_ratio=0.9,
              classifier_density=1.1)
    b = write(tmp_path, "a1", seed=1, fid=8.5, alignment=0.98, autoencoder_fid=16.5, diversity_ratio=0.95,
              classifier_density=1.4)
    compare.main([f"teacher={teacher}", f"student={a},{b}"])
    out = capsys.readouterr().out
    assert "| FID (classifier; selection) | 8.00 | 7.75 (7.00-8.50) |" in out
    # set 1 loses the classifier FID (8.5 > 8.0), set 0 wins it: mixed; the diversity ratio is further from 1
    # than the teacher's on both sets: lost; density is better closer to 1 (1.1 beats 0.7, 1.4 does not)
    assert ("student beats teacher on 2 of 5 measures (each of its 2 sample sets, against teacher's mean). "
            "Loses on: diversity ratio. Mixed or tied on: FID (classifier; selection), density (classifier).") in out


def test_against_picks_the_reference_and_missing_measures_are_named(tmp_path, capsys):
    t = write(tmp_path, "t", fid=8.0, classifier_precision=None)
    s = write(tmp_path, "s", fid=7.0, autoencoder_fid=16.0, classifier_precision=0.9)
    compare.main([f"teacher={t}", f"student={s}", "--against", "student"])
    out = capsys.readouterr().out
    assert "| FID (autoencoder) | - | 16.00 |" in out and "| precision (classifier) | - | 0.900 |" in out
    assert "teacher beats student on 0 of 1 measures (its sample set, against student's mean). " \
           "Loses on: FID (classifier; selection). Not in every file:" in out
    assert "precision (classifier)" in out.splitlines()[-1] and "FID (autoencoder)" in out.splitlines()[-1]


def test_bad_arguments_are_named(tmp_path, capsys):
    t = write(tmp_path, "t", fid=8.0)
    other = write(tmp_path, "o", model="other", fid=7.0)
    for argv, message in (([f"teacher{t}"], "NAME=JSON"), ([f"a={t}", f"a={t}"], "given twice"),
                          ([f"a={t}", "--against", "b"], "not one of the models"),
                          ([f"a={t},{t}"], "same sample set"), ([f"a={t},{other}"], "differ in 'model'")):
        with pytest.raises(SystemExit):
            compare.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot read .*none.json"):
        compare.main([f"a={tmp_path / 'none.json'}"])
