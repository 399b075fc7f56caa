"""scripts/missed_digits.py: stroke attributes on drawn strokes, per-digit recall verdicts against brute force, a
model that lacks one class shown to miss that class, and its errors; dmd2.metrics.neighbours.inside_any_ball."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from dmd2.metrics.mnist import real_digits
from dmd2.metrics.neighbours import inside_any_ball, knn_radii

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import missed_digits  # noqa: E402


def stroke(lean: float = 0.0, thickness: int = 1, length: int = 16) -> np.ndarray:
    """A 32 x 32 uint8 image of a straight stroke through the centre, its top `lean` pixels right per pixel up."""
    img = np.zeros((32, 32, 1), np.uint8)
    for dy in range(-length // 2, length // 2):
        x = int(round(16 + lean * dy))
        img[16 - dy, x:x + thickness, 0] = 255  # row 16 - dy is dy pixels above the centre
    return img


def test_stroke_attributes_read_slant_ink_and_width_of_drawn_strokes():
    images = np.stack([stroke(), stroke(lean=0.5), stroke(lean=-0.5), stroke(thickness=3)])
    a = missed_digits.stroke_attributes(images)
    assert abs(a["slant"][0]) < 1e-9
    assert a["slant"][1] == pytest.approx(0.5, abs=0.05) and a["slant"][2] == pytest.approx(-0.5, abs=0.05)
    assert a["ink"][3] == pytest.approx(3 * a["ink"][0]) and a["width"][3] > a["width"][0] + 0.5
    with pytest.raises(ValueError, match="1 blank image"):
        missed_digits.stroke_attributes(np.concatenate([images, np.zeros((1, 32, 32, 1), np.uint8)]))


def test_inside_any_ball_and_recalled_match_brute_force():
    rng = np.random.default_rng(0)
    points, centres = rng.normal(size=(90, 3)), rng.normal(size=(60, 3))
    radii = rng.uniform(0.2, 0.8, size=60)
    brute = (cdist(points, centres) < radii[None, :]).any(axis=1)
    assert np.array_equal(inside_any_ball(points, centres, radii, chunk=7), brute)
    assert 0 < brute.mean() < 1  # both verdicts occur
    k3 = np.sort(cdist(centres, centres) + np.diag(np.full(60, np.inf)), axis=1)[:, 2]
    assert np.array_equal(missed_digits.recalled(points, centres), (cdist(points, centres) < k3[None, :]).any(axis=1))
    assert np.allclose(knn_radii(centres, 3), k3)
    with pytest.raises(ValueError, match="60 centres need as many radii"):
        inside_any_ball(points, centres, radii[:5])


class Pixels(torch.nn.Module):
    """A stand-in feature network: the flattened pixels (the script only calls `features`)."""

    def features(self, x):
        return x.flatten(1)


def test_a_model_without_threes_misses_the_threes_and_nothing_else():
    images, labels = real_digits()
    order = np.random.default_rng(0).permutation(len(images))   # split 0, as the script draws it
    a, b = order[:2500], order[2500:]
    # Half A itself, its threes swapped for digits of other classes from half B: every real digit but the threes
    # has an exact copy among the samples.
    others = b[labels[b] != 3]
    model = images[a].copy()
    threes = np.flatnonzero(labels[a] == 3)
    model[threes] = images[others[:len(threes)]]
    result = missed_digits.attribute_scores(images, labels, {"no-threes": model}, split=0, nets={"pixels": Pixels()})
    rows = result["scores"]["spaces"]["pixels"]["no-threes"]
    assert all(rows["class"][c] == 1.0 for c in range(10) if c != 3)
    assert rows["class"][3] < 0.7
    assert "held-out real" in result["scores"]["spaces"]["pixels"]
    text = missed_digits.table(result["scores"])
    assert "| class 3 | " in text and "slant Q4" in text


def test_a_model_without_the_heaviest_digits_misses_the_top_ink_quartile_and_the_figure_shows_them(tmp_path):
    images, labels = real_digits()
    order = np.random.default_rng(0).permutation(len(images))
    a, b = order[:2500], order[2500:]
    ink = missed_digits.stroke_attributes(images)["ink"]
    heavy = ink[a] >= np.quantile(ink[a], 0.75)                    # A's top ink quartile, as the script bins it
    light_b = b[ink[b] < np.quantile(ink[a], 0.5)]
    model = images[a].copy()
    model[heavy] = images[light_b[:int(heavy.sum())]]
    result = missed_digits.attribute_scores(images, labels, {"light": model}, split=0, nets={"pixels": Pixels()})
    rows = result["scores"]["spaces"]["pixels"]["light"]
    assert rows["ink"][:3] == [1.0, 1.0, 1.0] and rows["ink"][3] < 0.8
    first = np.ones(2500, bool)
    second = result["verdicts"][("pixels", "light")]
    shown = missed_digits.figure(result["real_a"], first, second, tmp_path / "f.png", count=16)
    assert shown == int((~second).sum()) > 0
    from PIL import Image

    with Image.open(tmp_path / "f.png") as im:        # 2 blocks of 2 rows of 8 cells, 34 px, doubled
        assert im.size == (8 * 34 * 2, (4 * 34 + 12) * 2)


def test_bad_arguments_are_named(tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((10, 32, 32, 1), np.uint8))
    with pytest.raises(SystemExit, match="needs --pair FIRST,SECOND"):
        missed_digits.main([f"a={samples}", "--figure", str(tmp_path / "f.png"), "--pair", "a,b"])
    with pytest.raises(SystemExit, match="at least 2500 samples.*a has 10"):
        missed_digits.main([f"a={samples}"])
    with pytest.raises(SystemExit, match="cannot read samples"):
        missed_digits.main([f"a={tmp_path / 'none.npz'}"])
    with pytest.raises(SystemExit, match="two models have the same name"):
        missed_digits.main([f"a={samples}", f"a={samples}"])
