"""KID, precision/recall, density/coverage and the second feature space (the digit autoencoder), against
values worked out by hand and their known behaviour (a set against itself, added noise, mode collapse)."""

import json

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from dmd2.families.base import ModelLoadError
from dmd2.metrics.independent import evaluate_independent
from dmd2.metrics.kid import kid, mmd2_unbiased
from dmd2.metrics.mnist import real_digits
from dmd2.metrics.mnist_autoencoder import DEFAULT_PATH, load_autoencoder
from dmd2.metrics.neighbours import density_coverage, knn_radii, precision_recall


CENTRES = 2.0 * np.random.default_rng(99).normal(size=(10, 8))  # ten well-separated modes in 8-d


def _clusters(rng, n, modes=range(10), spread=0.3):
    """n points of a mixture of Gaussian clusters around CENTRES[modes], each with std `spread`."""
    return CENTRES[rng.choice(list(modes), n)] + spread * rng.normal(size=(n, CENTRES.shape[1]))


# --- KID: hand-computed values ------------------------------------------------------------

def test_mmd2_on_two_points_each_matches_the_hand_computation():
    # d = 1, k(x, y) = (x y + 1)^3. X = {0, 1}: k(0,1) = 1. Y = {1, 2}: k(1,2) = 27.
    # Cross: k(0,1) = 1, k(0,2) = 1, k(1,1) = 8, k(1,2) = 27, mean 37/4.
    # Unbiased MMD^2 = 2*1/(2*1) + 2*27/(2*1) - 2 * 37/4 = 1 + 27 - 18.5 = 9.5
    assert mmd2_unbiased([[0.0], [1.0]], [[1.0], [2.0]]) == pytest.approx(9.5, abs=1e-12)
    # d = 2 divides the dot product: X = {e1, e2}, Y = {(1,1), (0,0)}.
    # k(e1,e2) = 1, k((1,1),(0,0)) = 1; cross: e.(1,1) = 1 -> (1/2 + 1)^3 = 3.375 twice, e.0 -> 1 twice.
    # MMD^2 = 1 + 1 - 2 * (2*3.375 + 2) / 4 = 2 - 4.375 = -2.375 (the unbiased estimate can be negative)
    assert mmd2_unbiased([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]) == pytest.approx(-2.375, abs=1e-12)


def test_kid_over_subsets_of_the_whole_set_is_the_plain_estimate_with_zero_spread():
    mean, std = kid([[0.0], [1.0], [3.0]], [[1.0], [2.0], [2.5]], subsets=5, subset_size=10)
    # Subsets of size min(10, 3, 3) = 3 are permutations of both sets: MMD^2 does not change.
    assert mean == pytest.approx(mmd2_unbiased([[0.0], [1.0], [3.0]], [[1.0], [2.0], [2.5]]), abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_are_seeded_and_rejects_bad_input():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 4)), rng.normal(size=(300, 4)) + 0.2
    assert kid(x, y, subsets=10, subset_size=50) == kid(x, y, subsets=10, subset_size=50)
    assert kid(x, y, subsets=10, subset_size=50, seed=1) != kid(x, y, subsets=10, subset_size=50)
    with pytest.raises(ValueError, match="NaN"):
        kid(np.full((4, 2), np.nan), y)
    with pytest.raises(ValueError, match="dimensions differ"):
        kid(x, y[:, :3])


def test_kid_is_about_zero_for_one_distribution_and_grows_with_noise():
    rng = np.random.default_rng(1)
    real = _clusters(rng, 2000)
    same_mean, same_std = kid(real, _clusters(rng, 2000), subsets=20, subset_size=500)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert abs(kid(real, real, subsets=20, subset_size=500)[0]) < 3 * same_std + 1e-3  # a set against itself
    noisy = [kid(real, real + s * rng.normal(size=real.shape), subsets=20, subset_size=500)[0] for s in (1.5, 3.0, 6.0)]
    assert same_mean + 3 * same_std < noisy[0] < noisy[1] < noisy[2], noisy


# --- precision / recall, density / coverage: hand-computed values ------------------------

def test_neighbour_measures_on_a_one_dimensional_toy_set():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [1.2], [10.0], [10.4]])
    # k = 1: every real radius is 1, real balls (-1,1), (0,2), (1,3), (2,4) (open). Fake radii:
    # 0.5 and 1.2 -> 0.7, 10 and 10.4 -> 0.4, fake balls (-0.2,1.2), (0.5,1.9), (9.6,10.4), (10,10.8).
    np.testing.assert_allclose(knn_radii(real, 1), [1, 1, 1, 1])
    np.testing.assert_allclose(knn_radii(fake, 1), [0.7, 0.7, 0.4, 0.4])
    # precision: 0.5 and 1.2 lie in real balls, 10 and 10.4 do not -> 2/4.
    # recall: reals 0 and 1 lie in fake balls, 2 (> 1.9) and 3 do not -> 2/4.
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 0.5))
    # density: 0.5 is in the balls of 0 and 1, 1.2 in those of 1 and 2 -> 4 / (k=1 * 4 fakes) = 1.
    # coverage: reals 0, 1, 2 have a fake closer than 1 (0.5, 0.2, 0.8); real 3 does not (1.8) -> 3/4.
    assert density_coverage(real, fake, k=1) == pytest.approx((1.0, 0.75))
    # k = 3: real radii are the third-nearest distances 3, 2, 2, 3; the default k of precision/recall.
    np.testing.assert_allclose(knn_radii(real, 3), [3, 2, 2, 3])


def test_radii_match_brute_force_and_chunks_do_not_change_results():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(301, 5)), rng.normal(size=(257, 5)) + 0.5
    brute = np.sort(cdist(a, a), axis=1)[:, 3]  # column 0 is the point itself
    np.testing.assert_allclose(knn_radii(a, 3), brute, rtol=1e-10)
    np.testing.assert_allclose(knn_radii(a, 3, chunk=7), brute, rtol=1e-10)
    assert precision_recall(a, b, chunk=7) == precision_recall(a, b)
    assert density_coverage(a, b, chunk=7) == density_coverage(a, b)
    # Precision and recall against the definition, on sets of different sizes.
    d = cdist(a, b)
    r_a, r_b = brute, np.sort(cdist(b, b), axis=1)[:, 3]
    precision = (d < r_a[:, None]).any(axis=0).mean()   # b inside some ball of a
    recall = (d < r_b[None, :]).any(axis=1).mean()      # a inside some ball of b
    assert precision_recall(a, b) == pytest.approx((precision, recall), abs=1e-12)


def test_neighbour_measures_reject_too_few_points():
    with pytest.raises(ValueError, match="1 <= k < N"):
        precision_recall(np.zeros((10, 2)), np.arange(6.0).reshape(3, 2), k=3)


# --- precision / recall, density / coverage: known behaviour ------------------------------

def test_a_set_against_itself_scores_one_on_all_four():
    real = _clusters(np.random.default_rng(3), 1000)
    # Open balls: each point lies in its own ball, and its k-th neighbour on the rim does not count,
    # so each ball holds k points of the same set (itself and k - 1 others): density exactly 1.
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert density_coverage(real, real.copy()) == (1.0, 1.0)


def test_a_second_draw_of_the_same_distribution_scores_about_one():
    rng = np.random.default_rng(4)
    real, fake = _clusters(rng, 2000), _clusters(rng, 2000)
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    # k-NN balls underestimate the support in 8-d: about 0.86 here, not 1 (Kynkaanniemi et al. note the bias)
    assert precision > 0.8 and recall > 0.8 and coverage > 0.9, (precision, recall, coverage)
    assert 0.9 < density < 1.1, density


def test_added_noise_lowers_precision_and_density():
    rng = np.random.default_rng(5)
    real, fake = _clusters(rng, 2000), _clusters(rng, 2000)
    scores = [(precision_recall(real, f)[0], density_coverage(real, f)[0])
              for f in (fake + s * rng.normal(size=fake.shape) for s in (0.0, 0.2, 0.5))]
    precisions, densities = zip(*scores)
    assert precisions[0] > precisions[1] > precisions[2], precisions
    assert densities[0] > densities[1] > densities[2], densities


def test_mode_collapse_drops_recall_and_coverage_but_not_precision():
    rng = np.random.default_rng(6)
    real = _clusters(rng, 2000)
    collapsed = _clusters(rng, 2000, modes=[2, 7])  # two of the ten clusters, drawn afresh
    precision, recall = precision_recall(real, collapsed)
    density, coverage = density_coverage(real, collapsed)
    fresh_precision = precision_recall(real, _clusters(rng, 2000))[0]
    assert precision > fresh_precision - 0.03 and density > 0.9, (precision, fresh_precision, density)
    assert recall < 0.3 and coverage < 0.3, (recall, coverage)  # two modes of ten: about 0.2 each


# --- the autoencoder and the evaluator on real digits ------------------------------------

@pytest.fixture(scope="module")
def real():
    return real_digits()


def test_committed_autoencoder_matches_its_card_and_is_small():
    facts = json.loads((DEFAULT_PATH / "training.json").read_text())
    assert (DEFAULT_PATH / "model.safetensors").stat().st_size < 2 * 1024 ** 2
    assert "python -m training feature-net" in (DEFAULT_PATH / "MODEL_CARD.md").read_text()
    from training.classifier import heldout_split
    from training.data import load_mnist5k
    from training.feature_net import reconstruction_mse

    images, labels = load_mnist5k()
    held = heldout_split(labels, 50, facts["seed"])[1]
    assert reconstruction_mse(load_autoencoder(), images[held]) == pytest.approx(facts["heldout_mse"], abs=1e-5)


def test_feature_net_training_is_deterministic_given_the_seed(tmp_path):
    from training.feature_net import train_feature_net

    for name in ("a", "b"):
        train_feature_net(out=str(tmp_path / name), epochs=1, batch_size=32, limit=96, card=False)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    train_feature_net(out=str(tmp_path / "c"), epochs=1, batch_size=32, limit=96, seed=1, card=False)
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()


def test_a_missing_or_damaged_autoencoder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="python -m training feature-net"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        load_autoencoder(tmp_path / "bad")


def test_evaluator_on_real_digits_noise_and_collapse_in_both_feature_spaces(real):
    rng = np.random.default_rng(7)
    idx = rng.choice(len(real[1]), 1000, replace=False)
    images = real[0][idx]
    clean = evaluate_independent(images)
    noisy = evaluate_independent(np.clip(images + rng.normal(0, 48, images.shape), 0, 255).round().astype(np.uint8))
    first = np.array([np.flatnonzero(real[1] == c)[:5] for c in range(10)]).ravel()
    collapsed = evaluate_independent(real[0][np.repeat(first, 20)])  # five digits per class, each 20 times
    for space in ("classifier", "autoencoder"):
        c, n, m = ({k[len(space) + 1:]: v for k, v in r.items() if k.startswith(space)} for r in (clean, noisy, collapsed))
        assert c["precision"] == 1.0 and c["density"] > 0.9 and c["coverage"] > 0.5  # real digits, a subset of the reference
        assert n["kid"] > c["kid"] + 5 * c["kid_std"] and n["precision"] < c["precision"], (space, c, n)
        assert m["recall"] < 0.1 and m["coverage"] < 0.1 and m["precision"] == 1.0, (space, m)
    assert clean["autoencoder_fid"] < noisy["autoencoder_fid"] < np.inf
    assert set(clean) == {f"{s}_{k}" for s in ("classifier", "autoencoder")
                          for k in ("kid", "kid_std", "precision", "recall", "density", "coverage")} | {"autoencoder_fid"}


def test_evaluate_command_reports_every_measure_and_keeps_the_old_values(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import TINY_UNET
    from dmd2.families.pixel import PixelFamily
    from dmd2.metrics.mnist import evaluate_images

    torch.manual_seed(0)
    PixelFamily().save_student(PixelFamily().new_unet(**TINY_UNET), tmp_path / "tiny-teacher")
    root = DEFAULT_PATH.parent.parent.parent

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "dmd2", *args, "--model", str(tmp_path / "tiny-teacher"), "--num", "20",
                            "--steps", "1"], cwd=root, capture_output=True, text=True, timeout=600,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root)))
        assert r.returncode == 0, r.stderr
        return r.stdout

    stdout = run("evaluate", "--json", str(tmp_path / "m.json"))
    result = json.loads((tmp_path / "m.json").read_text())
    new = ["autoencoder_fid"] + [f"{s}_{k}" for s in ("classifier", "autoencoder")
                                 for k in ("kid", "kid_std", "precision", "recall", "density", "coverage")]
    printed = {line.split(":")[0].strip() for line in stdout.splitlines() if ":" in line}  # "  key: value" lines
    for key in new + ["fid", "alignment", "diversity", "diversity_ratio", "nfe", "ms_per_image", "precision"]:
        assert key in result and key in printed, key
    assert all(isinstance(result[k], float) for k in new) and result["precision"] == "fp32"
    run("sample", "--out", str(tmp_path / "s.npz"))  # the same samples: the old keys keep their old values
    samples = np.load(tmp_path / "s.npz")
    old = evaluate_images(samples["images"], samples["labels"])
    assert {k: result[k] for k in old} == old
