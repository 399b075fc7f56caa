"""scripts/recall_ceiling.py: the split-half recall ceiling and the copying distance, on real digits, copies of
them and noise, and its errors; and dmd2.metrics.neighbours.nearest_distances against brute force."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from dmd2.metrics.mnist import real_digits
from dmd2.metrics.neighbours import nearest_distances

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import recall_ceiling  # noqa: E402


def test_nearest_distances_match_brute_force_in_any_chunking():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(130, 4)), rng.normal(size=(77, 4))
    brute = cdist(a, b).min(axis=1)
    np.testing.assert_allclose(nearest_distances(a, b), brute, rtol=1e-10)
    np.testing.assert_allclose(nearest_distances(a, b, chunk=9), brute, rtol=1e-10)
    np.testing.assert_allclose(nearest_distances(b[:5], b), 0.0, atol=1e-6)  # a row of b is at distance 0
    with pytest.raises(ValueError, match="dimensions differ"):
        nearest_distances(a, b[:, :3])


ORDER = np.random.default_rng(7).permutation(5000)  # the digits are stored sorted by class


@pytest.fixture(scope="module")
def real():
    return real_digits()[0][ORDER[:1200]]  # a smaller real set keeps the test quick; halves of 600


def test_copies_are_called_copies_and_fresh_digits_are_not(real):
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, size=(300, 32, 32, 1)).astype(np.uint8)
    fresh = real_digits()[0][ORDER[1200:1500]]  # digits outside the reference set: draws like it, not copies of it
    out = recall_ceiling.copying(real, {"copier": real[100:400], "fresh": fresh, "noise": noise})
    held = out[recall_ceiling.HELD_OUT]
    assert held["near_copies"] == pytest.approx(0.01, abs=0.002)  # the 1st percentile, by construction
    assert out["copier"] == {"median_distance": pytest.approx(0.0, abs=1e-6), "near_copies": 1.0}
    assert out["fresh"]["near_copies"] < 0.05
    assert 0.6 * held["median_distance"] < out["fresh"]["median_distance"] < 1.6 * held["median_distance"]
    assert out["noise"]["median_distance"] > 2 * held["median_distance"] and out["noise"]["near_copies"] == 0.0


def test_held_out_real_scores_high_noise_scores_nothing_and_splits_differ(real):
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, size=(600, 32, 32, 1)).astype(np.uint8)
    rows = recall_ceiling.split_scores(real, {"noise": noise}, splits=2)
    held = rows[recall_ceiling.HELD_OUT]
    assert set(held) == {f"{s}_{m}" for s in ("classifier", "autoencoder") for m in recall_ceiling.MEASURES}
    assert all(len(v) == 2 for v in held.values())
    for space in ("classifier", "autoencoder"):
        assert min(held[f"{space}_recall"]) > 0.7 and min(held[f"{space}_precision"]) > 0.7, held
        assert 0.8 < np.mean(held[f"{space}_density"]) < 1.2
        assert max(rows["noise"][f"{space}_recall"]) == 0.0 and max(rows["noise"][f"{space}_coverage"]) == 0.0
    assert held["classifier_recall"][0] != held["classifier_recall"][1]  # two different halvings
    again = recall_ceiling.split_scores(real, {"noise": noise}, splits=2)
    assert again == rows  # seeded


def test_too_few_samples_is_an_error_naming_the_model(real):
    with pytest.raises(ValueError, match="at least 600 samples.*tiny has 10"):
        recall_ceiling.split_scores(real, {"tiny": real[:10]}, splits=1)


def test_bad_sample_files_are_errors_naming_the_file(tmp_path):
    np.savez(tmp_path / "labels.npz", labels=np.zeros(3))
    np.savez(tmp_path / "floats.npz", images=np.zeros((3, 32, 32, 1)))
    np.savez(tmp_path / "rgba.npz", images=np.zeros((3, 32, 32, 4), np.uint8))
    np.save(tmp_path / "bare.npy", np.zeros((3, 32, 32, 1), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "whole.npz", images=np.zeros((300, 32, 32, 1), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:5000])  # an interrupted write
    cases = {"x=" + str(tmp_path / "missing.npz"): "missing.npz: cannot read",
             "x=" + str(tmp_path / "labels.npz"): "no 'images' array",
             "x=" + str(tmp_path / "floats.npz"): "expected uint8 images",
             "x=" + str(tmp_path / "junk.npz"): "junk.npz: cannot read",
             "x=" + str(tmp_path / "cut.npz"): "cut.npz: cannot read",
             "x=" + str(tmp_path / "rgba.npz"): r"rgba.npz: expected uint8 images.*\(3, 32, 32, 4\)",
             "x=" + str(tmp_path / "bare.npy"): "bare.npy: a single array",
             str(tmp_path / "labels.npz"): "expected NAME=FILE.npz",
             "held-out real=" + str(tmp_path / "labels.npz"): "name of the held-out real half"}
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            recall_ceiling.load_samples(spec)


def test_the_command_writes_its_table_and_json(tmp_path, monkeypatch, real, capsys):
    monkeypatch.setattr(recall_ceiling, "real_digits", lambda: (real, None))
    np.savez(tmp_path / "c.npz", images=real[:600])
    recall_ceiling.main([f"copier={tmp_path / 'c.npz'}", "--splits", "1", "--json", str(tmp_path / "r.json"),
                         "--table", str(tmp_path / "r.md")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["half"] == 600 and data["splits"] == 1 and data["copying"]["copier"]["near_copies"] == 1.0
    assert set(data["rows"]) == {"held-out real", "copier"}
    # Half of the copier's samples are digits of the reference half itself: a recall fresh digits cannot reach.
    assert data["rows"]["copier"]["classifier_recall"][0] > data["rows"]["held-out real"]["classifier_recall"][0] + 0.03
    table = (tmp_path / "r.md").read_text()
    assert table == capsys.readouterr().out and "| classifier recall |" in table
    with pytest.raises(SystemExit, match="same name"):
        recall_ceiling.main([f"a={tmp_path / 'c.npz'}", f"a={tmp_path / 'c.npz'}"])
