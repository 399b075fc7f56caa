"""The instrument that has seen no MNIST digit (dmd2.metrics.optdigits), its trainer and scripts/outside_check.py."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd2.families.base import ModelLoadError
from dmd2.metrics.mnist import real_digits
from dmd2.metrics.optdigits import (OptdigitsNet, default_optdigits_net, evaluate_optdigits, load_optdigits_net,
                                    save_optdigits_net, to_optdigits)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import outside_check  # noqa: E402


def bar(size=28, top=6, bottom=22, left=12, width=3, slant=0.0) -> np.ndarray:
    """A uint8 (size x size x 1) vertical stroke, sheared by `slant` pixels of x per pixel of y."""
    img = np.zeros((size, size), np.uint8)
    for y in range(top, bottom):
        x = int(round(left + slant * (y - (top + bottom) / 2)))
        img[y, x:x + width] = 255
    return img[..., None]


def test_optdigits_format_counts_ink_in_blocks_and_leaves_an_empty_image_empty():
    counts = to_optdigits(np.stack([bar(), np.zeros((28, 28, 1), np.uint8)]))
    assert counts.shape == (2, 64)
    assert torch.equal(counts, counts.round()) and counts.min() >= 0 and counts.max() <= 16
    assert counts[0].sum() > 0 and counts[1].sum() == 0
    grid = counts[0].view(8, 8)
    assert grid[:, :2].sum() == 0 and grid[:, -2:].sum() == 0   # a thin upright stroke stays in the middle columns
    assert (grid[:, 3:5] > 0).all()                              # and spans the full height once scaled


def test_position_and_size_do_not_change_the_format_and_a_slanted_stroke_is_stood_upright(monkeypatch):
    base = to_optdigits(bar()[None])
    assert torch.equal(to_optdigits(bar(left=5, top=2, bottom=18)[None]), base)   # another place
    small, large = to_optdigits(bar(top=4, bottom=14, width=2)[None]), to_optdigits(bar(top=4, bottom=19)[None])
    assert (small - large).abs().sum() <= 0.05 * large.sum()                       # 1.5 times the size
    slanted = bar(slant=0.4)[None]                                                # sheared by about 22 degrees
    upright = to_optdigits(slanted).view(8, 8)
    assert (upright - upright[3]).abs().max() <= 4          # every block row (nearly) the same: a vertical stroke

    import dmd2.metrics.optdigits as optdigits
    monkeypatch.setattr(optdigits, "_deskew", lambda x: x)
    leaning = to_optdigits(slanted).view(8, 8)
    assert (leaning - leaning[3]).abs().max() >= 12         # without deskewing, the rows differ: it leans


def test_real_mnist_digits_transfer_as_the_card_says():
    """The committed network reads real MNIST digits as its card and training.json say (it never trained on them)."""
    facts = json.loads((ROOT / "assets" / "mnist" / "optdigits" / "training.json").read_text())
    images, labels = real_digits()
    preds = default_optdigits_net()(to_optdigits(images)).argmax(1).numpy()
    assert (preds == labels).mean() == pytest.approx(facts["mnist_accuracy"], abs=1e-4)
    assert facts["mnist_accuracy"] > 0.5                               # far above chance (0.1), far below 1
    card = (ROOT / "assets" / "mnist" / "optdigits" / "MODEL_CARD.md").read_text()
    assert facts["command"] in card and f"{facts['mnist_accuracy']:.4f}" in card


def test_real_digits_against_themselves_score_perfectly_and_a_collapsed_set_loses_recall():
    images, labels = real_digits()
    same = evaluate_optdigits(images, labels)
    assert same["optdigits_fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["optdigits_precision"] == same["optdigits_recall"] == 1.0
    assert set(same) == {f"optdigits_{k}" for k in
                         ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage", "alignment")}
    # mode collapse: the first digit of each class, repeated 500 times
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(10)]).repeat(500)
    collapsed = evaluate_optdigits(images[first], labels[first])
    assert collapsed["optdigits_recall"] < 0.1 and collapsed["optdigits_coverage"] < 0.1
    assert collapsed["optdigits_fid"] > 10 * max(same["optdigits_fid"], 1e-3)


def test_evaluate_refuses_mismatched_labels_and_a_single_image():
    images, labels = real_digits()
    with pytest.raises(ValueError, match="one label each"):
        evaluate_optdigits(images[:10], labels[:9])
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate_optdigits(images[:1], labels[:1])


def test_a_saved_network_loads_back_and_a_missing_one_names_the_training_command(tmp_path):
    torch.manual_seed(0)
    net = OptdigitsNet()
    save_optdigits_net(net, tmp_path / "net")
    back = load_optdigits_net(tmp_path / "net")
    x = torch.rand(4, 64) * 16
    assert torch.equal(back(x), net.eval()(x))
    with pytest.raises(ModelLoadError, match="python -m training optdigits-net"):
        load_optdigits_net(tmp_path / "nowhere")


def test_the_instrument_id_changes_with_the_network_or_the_mapping_and_names_a_missing_file(tmp_path, monkeypatch):
    import dmd2.metrics.optdigits as optdigits
    from dmd2.metrics.optdigits import instrument_id

    committed = instrument_id()
    assert committed == instrument_id() and len(committed) == 16
    torch.manual_seed(0)
    save_optdigits_net(OptdigitsNet(), tmp_path / "other")
    assert instrument_id(tmp_path / "other") != committed          # other weights
    monkeypatch.setattr(optdigits, "DILATE", 0)
    assert instrument_id() != committed                            # the same weights read through another mapping
    with pytest.raises(ModelLoadError, match="model.safetensors.*python -m training optdigits-net"):
        instrument_id(tmp_path / "nowhere")


def test_training_is_deterministic_and_writes_a_card(tmp_path):
    from training.optdigits_net import train_optdigits_net

    a = train_optdigits_net(out=str(tmp_path / "a"), epochs=2)
    b = train_optdigits_net(out=str(tmp_path / "b"), epochs=2, card=False)
    assert a["heldout_digits"] == 180 and a["train_digits"] == 1617
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert "No MNIST digit is used in training" in (tmp_path / "a" / "MODEL_CARD.md").read_text()


# scripts/outside_check.py

def test_a_row_names_a_label_and_its_seeds():
    assert outside_check.parse_row("4-step=a/student, b/student") == ("4-step", ["a/student", "b/student"])
    for bad in ("no-equals", "=model", "label=", "label= , "):
        with pytest.raises(SystemExit, match="LABEL=MODEL"):
            outside_check.parse_row(bad)


def result(fid, recall, alignment=0.8):
    keys = [k for k, _, _ in outside_check.MEASURES]
    row = dict.fromkeys(keys, 0.5)
    row.update(optdigits_fid=fid, optdigits_recall=recall, optdigits_alignment=alignment)
    return row


def test_the_table_gives_means_spreads_and_what_every_seed_wins_or_loses():
    rows = {"teacher": [[result(1.0, 0.9), result(1.2, 0.9)]],                 # one seed, two sample sets
            "student": [[result(0.5, 0.8, 0.9)], [result(0.7, 0.95, 0.9)]]}     # two seeds
    text = outside_check.table(rows, [], real_alignment=0.76)
    teacher_row = next(line for line in text.splitlines() if line.startswith("| teacher"))
    assert "| 1.100 (1.000 / 1.200) |" in teacher_row
    student_row = next(line for line in text.splitlines() if line.startswith("| student"))
    assert "| 0.600 ± 0.141 [0.500, 0.700] |" in student_row
    # FID (0.5, 0.7 < 1.1) and alignment won by every seed; recall split (0.8 < 0.9 < 0.95): neither list;
    # the measures where both are 0.5 are ties, in neither list
    assert "- student against teacher: every seed beats it on 2 of 7 (FID, alignment); every seed loses on none" in text
    assert "0.760" in text


def test_a_result_is_kept_only_for_its_model_count_seed_and_a_student_not_retrained_since(tmp_path):
    from conftest import make_tiny_students

    student = make_tiny_students(tmp_path)[0]
    out = tmp_path / "r.json"
    from dmd2.metrics.optdigits import instrument_id

    held = {"model": student, "num": 50, "seed": 1000, "optdigits_fid": 1.0}
    out.write_text(json.dumps(held))
    assert not outside_check.is_current(out, student, 50, 1000)     # no instrument named: scored before fingerprints
    out.write_text(json.dumps({**held, "optdigits_instrument": "another network"}))
    assert not outside_check.is_current(out, student, 50, 1000)
    out.write_text(json.dumps({**held, "optdigits_instrument": instrument_id()}))
    assert outside_check.is_current(out, student, 50, 1000)
    assert not outside_check.is_current(out, student, 60, 1000)
    assert not outside_check.is_current(out, student, 50, 1)
    assert not outside_check.is_current(out, str(tmp_path / "tiny-2step"), 50, 1000)
    (Path(student) / "MODEL_CARD.md").write_text("edited after scoring")
    assert outside_check.is_current(out, student, 50, 1000)     # a card edited since is not a new model
    old = os.stat(out).st_mtime - 100
    os.utime(out, (old, old))                                   # the student's weights are newer than its result
    assert not outside_check.is_current(out, student, 50, 1000)
    out.write_text(json.dumps({"model": student, "num": 50, "seed": 1000}))   # evaluate's keys, not this space's
    assert not outside_check.is_current(out, student, 50, 1000)
    out.write_text("{broken")
    assert not outside_check.is_current(out, student, 50, 1000)


def test_scores_a_tiny_student_on_two_sample_sets_then_reuses_them(tmp_path, capsys):
    from conftest import make_tiny_students

    from dmd2.metrics.optdigits import instrument_id

    two = make_tiny_students(tmp_path)[1]
    argv = ["--model", f"a={two}", "--model", f"b={two}", "--versus", "a=b", "--num", "20",
            "--results", str(tmp_path / "results")]
    outside_check.main(argv)
    out = capsys.readouterr().out
    assert out.count("-m dmd2 evaluate") == 2 and out.count("--optdigits") == 2     # b's sets are a's: scored once
    saved = json.loads(outside_check.result_path(tmp_path / "results", two, 1).read_text())
    assert saved["model"] == two and saved["seed"] == 1000 and saved["num"] == 20 and saved["nfe"] == 2
    assert "optdigits_recall" in saved and "autoencoder_recall" in saved      # this space's and evaluate's measures
    assert saved["optdigits_instrument"] == instrument_id()
    assert "- b against a:" in out and "- a against b:" in out
    assert (tmp_path / "results" / "table.md").read_text().strip() in out
    outside_check.main(argv)
    assert "-m dmd2 evaluate" not in capsys.readouterr().out      # nothing sampled again


def test_bad_arguments_are_refused_naming_them(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for argv, message in ((["--model", "a=x", "--model", "a=y"], "share a label"),
                          (["--model", "a=mnist-teacher", "--versus", "a=zz"], "--versus 'a=zz'"),
                          (["--model", "a=x", "--num", "3"], "--num must be at least 4"),
                          (["--model", "a=x", "--sample-sets", "0", "0"], "--sample-sets must be distinct"),
                          (["--model", f"a={tmp_path / 'nowhere'}"], "no such model"),
                          (["--model", "a=mnist-teacher", "--results", str(tmp_path / "file")], "is a file")):
        with pytest.raises(SystemExit):
            outside_check.main(argv + ([] if "--results" in argv else ["--results", str(tmp_path / "r")]))
        assert message in capsys.readouterr().err


def test_sample_sets_share_no_image_where_neighbouring_seeds_share_most():
    """generate_many seeds batch b with seed + b: seeds 0 and 1 share every batch but one; sample sets do not."""
    from conftest import make_tiny_students

    from dmd2 import registry
    from dmd2.sampling import generate_many, sample_set_seed

    import tempfile
    with tempfile.TemporaryDirectory() as root:
        model = registry.load(make_tiny_students(Path(root))[0])
        # batches of 10, a multiple of the 10 classes as evaluate's 250 is: every batch has the same labels
        zero, one = (generate_many(model, 30, seed, batch_size=10)[0] for seed in (0, 1))
        assert np.array_equal(zero[10:], one[:20])                 # the flaw the sample-set seeds avoid
        other = generate_many(model, 30, sample_set_seed(1), batch_size=10)[0]
    assert sample_set_seed(0) == 0 and sample_set_seed(1) == 1000
    assert not any(np.array_equal(a, b) for a in zero for b in other)


def test_evaluate_adds_the_optdigits_measures_on_request(tmp_path):
    import subprocess

    from conftest import make_tiny_students

    student = make_tiny_students(tmp_path)[0]
    out = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "dmd2", "evaluate", "--model", student, "--num", "10", "--optdigits",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"fid", "autoencoder_fid", "optdigits_fid", "optdigits_alignment"} <= set(result)
    assert "optdigits_recall:" in done.stdout
