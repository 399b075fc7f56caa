"""scripts/mixture.py: which real digits two students miss, and a mixture that draws half its samples from each."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import mixture  # noqa: E402


def test_missed_is_recalls_own_test_per_real_digit():
    real = np.arange(10.0)[:, None]
    fake = np.array([0.1, 0.2, 0.3, 0.4, 20.0])[:, None]   # the outlier's ball (radius 19.8) reaches 1..9; 0.1's holds 0
    assert mixture.missed(real, fake).tolist() == [False] * 10
    near = np.array([0.0, 0.1, 0.2, 0.3])[:, None]           # k = 3 radii 0.3, 0.2, 0.1, 0.2: only the real 0 is reached
    assert mixture.missed(real, near).tolist() == [False] + [True] * 9
    from dmd2.metrics.neighbours import precision_recall

    assert 1 - mixture.missed(real, near).mean() == pytest.approx(precision_recall(real, near, k=3)[1])


def test_shares_and_the_repeat_share_hand_computed():
    first = np.array([True, True, True, True, False, False])
    second = np.array([True, True, False, False, True, False])
    assert mixture.shared_share(first, second) == 0.5               # 2 of first's 4 misses
    assert mixture.shared_share(second, first) == pytest.approx(2 / 3)
    assert np.isnan(mixture.shared_share(np.zeros(3, bool), second))
    assert mixture.repeat_share(0.8, 0.5, 0.2) == pytest.approx(0.5)   # (0.5 - 0.2) / (0.8 - 0.2)
    assert mixture.repeat_share(0.8, 0.8, 0.2) == 1.0
    assert np.isnan(mixture.repeat_share(0.2, 0.5, 0.2))            # no repeatability beyond chance


def test_verdicts_on_their_boundaries():
    assert mixture.shared_verdict({"classifier": 0.8, "autoencoder": 0.95}) == "the preset's misses"
    assert mixture.shared_verdict({"classifier": 0.5, "autoencoder": 0.1}) == "each seed's own"
    assert mixture.shared_verdict({"classifier": 0.79, "autoencoder": 0.9}) == "partly shared"
    assert mixture.shared_verdict({"classifier": 0.6, "autoencoder": 0.4}) == "partly shared"
    assert mixture.shared_verdict({"classifier": float("nan"), "autoencoder": 0.9}).startswith("undefined")
    assert mixture.mixture_verdict({"classifier": 0.02, "autoencoder": 0.05}) == "lifts"
    assert mixture.mixture_verdict({"classifier": 0.0099, "autoencoder": -0.02}) == "no lift"
    assert mixture.mixture_verdict({"classifier": 0.01, "autoencoder": 0.0}) == "inconclusive"
    assert mixture.mixture_verdict({"classifier": 0.03, "autoencoder": 0.015}) == "inconclusive"
    # gains are differences of recalls (multiples of 1/5000): 0.82 - 0.80 is 0.0199999... in floats, still "lifts"
    assert mixture.mixture_verdict({"classifier": 0.82 - 0.80, "autoencoder": 0.8234 - 0.8034}) == "lifts"
    assert mixture.mixture_verdict({"classifier": 0.81 - 0.80, "autoencoder": 0.0}) == "inconclusive"


def test_the_mixture_takes_whole_batches_from_each_and_no_noise_twice():
    n = 1000
    labels = np.arange(n) % 10
    index = np.arange(n)[:, None, None, None]
    a, b = (index, labels), (index + 10_000, labels)    # each image its own index (+ 10,000 for B's)
    images, mixed = mixture.mix(a, b)
    assert np.array_equal(images[:500], index[:500]) and np.array_equal(images[500:], index[500:] + 10_000)
    assert np.array_equal(mixed, labels)
    assert all((np.bincount(mixed[part], minlength=10) == 50).all() for part in (slice(0, 500), slice(500, None)))
    with pytest.raises(ValueError, match="one size, a multiple of 500: got 1000 and 750"):
        mixture.mix(a, (b[0][:750], labels[:750]))
    with pytest.raises(ValueError, match="a multiple of 500: got 750"):
        mixture.mix((a[0][:750], labels[:750]), (b[0][:750], labels[:750]))
    with pytest.raises(ValueError, match="labels differ"):
        mixture.mix(a, (b[0], np.roll(labels, 1)))


def _clusters(monkeypatch, rows):
    """Stand-ins for the feature networks: an 'image' is its own 2-d feature vector, the real set two clusters;
    `score` gives only the recalls (the neighbour test the measures use)."""
    from dmd2.metrics import independent
    from dmd2.metrics.neighbours import precision_recall

    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (300, 2)), rng.normal(20, 1, (300, 2))])
    monkeypatch.setattr(independent, "real_features", lambda net: real)
    monkeypatch.setattr(independent, "embed", lambda net, x: np.asarray(x, dtype=np.float64).reshape(len(x), -1))
    monkeypatch.setattr("dmd2.metrics.mnist._to_tensor", lambda images: images)
    monkeypatch.setattr(mixture, "score", lambda images, labels, nets: {
        f"{space}_recall": precision_recall(real, images.reshape(len(images), -1).astype(np.float64), k=3)[1]
        for space in mixture.SPACES})
    return mixture.analyse(rows, {space: space for space in mixture.SPACES})


def _draw(rng, centre, n=500):
    return rng.normal(centre, 1, (n, 2)), np.arange(n) % 10


def test_two_students_that_cover_different_clusters_miss_their_own_digits_and_the_mixture_lifts(monkeypatch):
    rng = np.random.default_rng(1)
    # A covers the first cluster, B the second: each misses the other's half of the real digits
    result = _clusters(monkeypatch, {"A": [_draw(rng, 0), _draw(rng, 0)], "B": [_draw(rng, 20), _draw(rng, 20)]})
    for space in mixture.SPACES:
        sh = result["shared"][space]
        assert sh["o_cross"] < 0.1 < 0.9 < sh["o_self"] and sh["s"] < 0.1
        assert result["recall"]["A"][space] < 0.55 and result["recall"]["mixture"][space] > 0.9
        assert result["gain"][space] == pytest.approx(result["recall"]["mixture"][space]
                                                      - (result["recall"]["A"][space] + result["recall"]["B"][space]) / 2)
        assert sh["recall_mismatch"] < 1e-12   # the miss test and the reported recall agree
    assert result["shared_verdict"] == "each seed's own" and result["mixture_verdict"] == "lifts"


def test_the_chance_level_is_bs_miss_rate_and_the_gain_is_against_the_mean_of_a_and_b(monkeypatch):
    """A covers the first cluster from two sets, B covers both clusters thinly: B misses less, so o_0 (B's miss
    rate) differs from A's, and the mixture's gain is measured against the mean recall, not the better one."""
    rng = np.random.default_rng(3)
    both = lambda: (np.concatenate([rng.normal(0, 1, (250, 2)), rng.normal(20, 1, (250, 2))]), np.arange(500) % 10)
    result = _clusters(monkeypatch, {"A": [_draw(rng, 0), _draw(rng, 0)], "B": [both(), both()]})
    for space in mixture.SPACES:
        sh = result["shared"][space]
        assert sh["o_0"] == pytest.approx(np.mean(sh["miss_rates"]["B"]))
        assert sh["o_0"] < np.mean(sh["miss_rates"]["A"]) - 0.2
        rc = result["recall"]
        assert result["gain"][space] == pytest.approx(rc["mixture"][space] - (rc["A"][space] + rc["B"][space]) / 2)


def test_a_student_against_itself_shares_every_miss_and_its_mixture_is_itself(monkeypatch):
    rng = np.random.default_rng(2)
    sets = [_draw(rng, 0), _draw(rng, 0)]
    result = _clusters(monkeypatch, {"A": sets, "B": sets})
    for space in mixture.SPACES:
        assert result["shared"][space]["s"] == pytest.approx(1.0) and result["gain"][space] == 0.0
    assert result["shared_verdict"] == "the preset's misses" and result["mixture_verdict"] == "no lift"


def test_end_to_end_on_kept_sample_sets_with_the_real_networks(tmp_path):
    """Two sample sets of the embedded 1-step student, kept as npz files the way `sample` writes them: with B = A the
    mixture is A's own sets, so its 14 measures equal A's to the last digit, and every share is 1."""
    from dmd2.sampling import sample_set_seed

    samples, out = tmp_path / "samples", tmp_path / "out"
    for k in (0, 1):
        from optdigits_diagnosis import sample_command, samples_path

        import subprocess

        path = samples_path(samples, "mnist-dmd2-1step", k)
        path.parent.mkdir(parents=True, exist_ok=True)
        assert subprocess.run(sample_command("mnist-dmd2-1step", sample_set_seed(k), 500, path), cwd=ROOT).returncode == 0
    mixture.main(["A=mnist-dmd2-1step", "B=mnist-dmd2-1step", "--num", "500", "--samples", str(samples),
                  "--out", str(out), "--name", "self"])
    for k in (0, 1):
        a = json.loads((out / f"self-A-set{k}.json").read_text())
        m = json.loads((out / f"self-mixture-set{k}.json").read_text())
        keys = [key for key in a if key.endswith(("recall", "precision", "fid", "kid", "coverage", "density"))]
        assert len(keys) >= 11 and all(a[key] == m[key] for key in keys)
        assert m["rows"] == {"A": "mnist-dmd2-1step", "B": "mnist-dmd2-1step"} and a["num"] == 500
        assert a["seed"] == m["seed"] == sample_set_seed(k)   # what scripts/compare.py reads
        assert a["classifier_recall"] == pytest.approx(1 - json.loads((out / "self.json").read_text())
                                                      ["shared"]["classifier"]["miss_rates"]["A"][k])
    summary = json.loads((out / "self.json").read_text())
    assert summary["shared_verdict"] != "each seed's own" and summary["mixture_verdict"] == "no lift"
    assert all(summary["shared"][s]["o_cross"] == summary["shared"][s]["o_self"] for s in mixture.SPACES)
    assert "Mixture: **no lift**" in (out / "self.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["A=x"], "the following arguments are required|expected 2 arguments|students"),
    (["A=x", "C=y"], "'C=y': name the two students A=MODEL and B=MODEL"),
    (["A=x", "A=y"], "'A=y': name the two students"),
    (["A=x", "B="], "'B=': name the two students"),
    (["A=x", "B=y", "--num", "750"], "--num must be a positive multiple of 500 (two halves of whole batches), got 750"),
    (["A=x", "B=y", "--sample-sets", "1", "1"], "two different sets, got 1 twice"),
    (["A=x", "B=y", "--sample-sets", "-1", "1"], "--sample-sets must be >= 0"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        mixture.main(argv)
    assert any(part in capsys.readouterr().err for part in message.split("|"))
