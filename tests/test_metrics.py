"""Frechet distance, the committed MNIST classifier and the MNIST evaluator (FID, alignment, diversity)."""

import json
import shutil

import numpy as np
import pytest
import torch

from dmd2.families.base import ModelLoadError
from dmd2.metrics.frechet import feature_stats, frechet_distance
from dmd2.metrics.mnist import evaluate_images, real_digits
from dmd2.metrics.mnist_net import DEFAULT_PATH, MnistClassifier, load_classifier, save_classifier
from dmd2.images import to_uint8
from training.classifier import heldout_split
from training.data import load_mnist5k


@pytest.fixture(scope="module")
def real():
    return real_digits()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Frechet distance -------------------------------------------------------------------

def test_frechet_of_a_feature_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    mu, sigma = feature_stats(feats)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-8


def test_frechet_matches_closed_form_for_1d_and_diagonal_gaussians():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance(0.0, 4.0, 1.0, 1.0) == pytest.approx(1.0 + (2.0 - 1.0) ** 2)
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    v1, v2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_with_non_commuting_covariances_matches_the_symmetric_form():
    # S1 S2 is not symmetric; Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2).
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 12), _spd(rng, 12)
    assert not np.allclose(s1 @ s2, (s1 @ s2).T)
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_frechet_handles_singular_covariances():
    # Orthogonal rank-1 covariances: S1 S2 = 0, so the distance is |dmu|^2 + 1 + 1.
    assert frechet_distance([0, 0], np.diag([1.0, 0]), [1, 0], np.diag([0, 1.0])) == pytest.approx(3.0, abs=1e-4)
    # Constant features: zero covariance, only the means count.
    assert frechet_distance([1, 2], np.zeros((2, 2)), [1, 0], np.zeros((2, 2))) == pytest.approx(4.0)
    # Fewer samples than dimensions: rank-deficient covariances, still finite and ~0 with itself.
    rng = np.random.default_rng(3)
    mu_a, sig_a = feature_stats(rng.normal(size=(10, 64)))
    mu_b, sig_b = feature_stats(rng.normal(size=(10, 64)) + 1.0)
    assert frechet_distance(mu_a, sig_a, mu_a, sig_a) < 1e-3 * np.trace(sig_a)
    d = frechet_distance(mu_a, sig_a, mu_b, sig_b)
    assert np.isfinite(d) and d > 64 * 0.5


def test_frechet_rejects_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):  # not a covariance: (-I)(I) has no real square root
        frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 5)))


def test_feature_stats_are_mean_and_unbiased_covariance():
    feats = np.random.default_rng(4).normal(size=(50, 3)).astype(np.float32)
    mu, sigma = feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False))


# --- the classifier ---------------------------------------------------------------------

def test_real_digits_are_the_training_data(real):
    images, labels = load_mnist5k()
    np.testing.assert_array_equal(real[0], to_uint8(images))
    np.testing.assert_array_equal(real[1], labels.numpy())


def test_committed_classifier_is_accurate_on_heldout_digits(real, classifier):
    _, held = heldout_split(torch.from_numpy(real[1]))
    held = held.numpy()
    result = evaluate_images(real[0][held], real[1][held], classifier)
    assert result["alignment"] > 0.9
    card = (DEFAULT_PATH / "MODEL_CARD.md").read_text()
    assert "python -m training.classifier" in card and "Held-out accuracy" in card


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = MnistClassifier(widths=(8, 8), feature_dim=16).eval()
    save_classifier(model, tmp_path)
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    torch.testing.assert_close(load_classifier(tmp_path)(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["no folder", "no weights", "no config", "corrupt weights",
                                    "corrupt config", "wrong architecture", "shape mismatch"])
def test_missing_or_corrupt_classifier_files_raise_model_load_error(tmp_path, damage):
    path = tmp_path / "clf"
    shutil.copytree(DEFAULT_PATH, path)
    bad = {"no folder": path, "no weights": path / "model.safetensors", "no config": path / "config.json"}
    if damage == "no folder":
        shutil.rmtree(path)
    elif damage in bad:
        bad[damage].unlink()
    elif damage == "corrupt weights":
        (path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    elif damage == "corrupt config":
        (path / "config.json").write_text("{not json")
    else:
        config = json.loads((path / "config.json").read_text())
        config.update(architecture="ResNet") if damage == "wrong architecture" else config.update(feature_dim=64)
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=str(path)):
        load_classifier(path)


# --- the evaluator ----------------------------------------------------------------------

def test_fid_of_real_digits_against_themselves_is_near_zero(real, classifier):
    assert evaluate_images(real[0], real[1], classifier)["fid"] < 1e-3


def test_fid_grows_monotonically_with_added_noise(real, classifier):
    idx = np.random.default_rng(5).choice(len(real[1]), 1000, replace=False)
    images, labels = real[0][idx].astype(np.float64), real[1][idx]
    noise = np.random.default_rng(6).normal(size=images.shape)
    fids = [evaluate_images(np.clip(images + s * noise, 0, 255).round().astype(np.uint8), labels, classifier)["fid"]
            for s in (0, 16, 48, 128)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_alignment_with_shuffled_labels_is_near_chance(real, classifier):
    idx = np.random.default_rng(7).choice(len(real[1]), 1000, replace=False)
    wrong = np.random.default_rng(7).permutation(real[1][idx])
    assert abs(evaluate_images(real[0][idx], wrong, classifier)["alignment"] - 0.1) < 0.05


def test_diversity_ratio_is_one_for_real_digits_and_low_for_a_collapsed_set(real, classifier):
    idx = np.random.default_rng(8).choice(len(real[1]), 1000, replace=False)
    fresh = evaluate_images(real[0][idx], real[1][idx], classifier)
    assert 0.9 < fresh["diversity_ratio"] < 1.1
    first = np.array([np.flatnonzero(real[1] == c)[0] for c in range(10)])
    collapsed_idx = np.repeat(first, 100)  # one image per class, repeated
    collapsed = evaluate_images(real[0][collapsed_idx], real[1][collapsed_idx], classifier)
    assert collapsed["diversity_ratio"] < 0.05
    assert collapsed["diversity_real"] == pytest.approx(fresh["diversity_real"], rel=0.02)
    assert collapsed["fid"] > 10 * fresh["fid"]


def test_evaluator_accepts_28px_and_rejects_bad_inputs(real, classifier):
    r32 = evaluate_images(real[0][:200], real[1][:200], classifier)
    r28 = evaluate_images(real[0][:200, 2:30, 2:30], real[1][:200], classifier)
    assert r28 == r32
    with pytest.raises(ValueError, match="uint8"):
        evaluate_images(real[0][:4].astype(np.float32), real[1][:4], classifier)
    with pytest.raises(ValueError, match="shape"):
        evaluate_images(real[0][:4, :16], real[1][:4], classifier)
    with pytest.raises(ValueError, match="one label per image"):
        evaluate_images(real[0][:4], real[1][:3], classifier)
    with pytest.raises(ValueError, match="0..9"):
        evaluate_images(real[0][:2], [0, 10], classifier)
