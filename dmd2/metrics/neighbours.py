"""k-nearest-neighbour measures of fidelity and diversity in a feature space, in float64, distances in chunks.

- precision / recall (Kynkaanniemi et al. 2019): the fraction of generated samples inside the real
  manifold (the union of balls around real samples with radius their k-th nearest real neighbour), and
  of real samples inside the generated manifold.
- density / coverage (Naeem et al. 2020): how many real balls hold each generated sample, divided by k
  (about 1 when both sets come from one distribution); the fraction of real balls holding any generated sample.

Balls are open (distance < radius), as in Naeem et al.: a set against itself then has precision, recall,
coverage and density all exactly 1. With continuous features, ties have probability zero.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dmd2.metrics.kid import _features

CHUNK = 512  # rows per block of a distance matrix: 512 x 5000 float64 is 20 MB


def _distance_rows(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK):
    """Yield (first row, Euclidean distances from a[first:first+chunk] to every row of b)."""
    bb = np.einsum("ij,ij->i", b, b)
    for start in range(0, len(a), chunk):
        x = a[start:start + chunk]
        d2 = np.einsum("ij,ij->i", x, x)[:, None] + bb[None, :] - 2.0 * (x @ b.T)
        yield start, np.sqrt(np.maximum(d2, 0.0))  # tiny negatives are round-off


def _pair(real, fake) -> tuple[np.ndarray, np.ndarray]:
    """Both sets as checked float64 arrays of one feature dimension."""
    real, fake = _features("real", real), _features("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
    return real, fake


def knn_radii(a, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Distance from each row of `a` to its k-th nearest other row (itself left out)."""
    a = _features("features", a)
    if not 1 <= k < len(a):
        raise ValueError(f"k-nearest-neighbour radii need 1 <= k < N, got k={k} with N={len(a)}")
    out = np.empty(len(a))
    for start, d in _distance_rows(a, a, chunk):
        rows = np.arange(len(d))
        d[rows, start + rows] = np.inf  # not its own neighbour
        out[start:start + len(d)] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def nearest_distances(a, b, chunk: int = CHUNK) -> np.ndarray:
    """Distance from each row of `a` to its nearest row of `b` (how close a sample comes to copying one of `b`)."""
    a, b = _features("a", a), _features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return np.concatenate([d.min(axis=1) for _, d in _distance_rows(a, b, chunk)])


def inside_any_ball(points, centres, radii, chunk: int = CHUNK) -> np.ndarray:
    """For each row of `points`: does it lie inside (distance < radius) the ball of some row of `centres`?"""
    points, centres = _pair(points, centres)
    radii = np.asarray(radii, dtype=np.float64)
    if radii.shape != (len(centres),):
        raise ValueError(f"{len(centres)} centres need as many radii, got shape {radii.shape}")
    return np.concatenate([(d < radii[None, :]).any(axis=1) for _, d in _distance_rows(points, centres, chunk)])


def precision_recall(real, fake, k: int = 3, chunk: int = CHUNK) -> tuple[float, float]:
    """(precision, recall) with k-NN radii (Kynkaanniemi et al. 2019): the fraction of fake samples inside some
    real ball, and of real samples inside some fake ball."""
    real, fake = _pair(real, fake)
    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    return (float(inside_any_ball(fake, real, r_real, chunk).mean()),
            float(inside_any_ball(real, fake, r_fake, chunk).mean()))


def density_coverage(real, fake, k: int = 5, chunk: int = CHUNK) -> tuple[float, float]:
    """(density, coverage) with k-NN radii of the real set (Naeem et al. 2020)."""
    real, fake = _pair(real, fake)
    r_real = knn_radii(real, k, chunk)
    inside, covered = 0, np.zeros(len(real), dtype=bool)
    for start, d in _distance_rows(real, fake, chunk):
        hits = d < r_real[start:start + len(d), None]  # real i's ball holds fake j
        inside += int(hits.sum())
        covered[start:start + len(d)] = hits.any(axis=1)
    return inside / (k * len(fake)), float(covered.mean())


class RecallParts(NamedTuple):
    """What recall is made of, computed once and shared by `recall_breakdown` and `recall_by_rarity`: each set's k-NN
    radii, which generated samples are inside the real manifold (`on`, precision's test) and which real samples are
    inside some generated ball (`reached`, recall's)."""
    real_radii: np.ndarray
    fake_radii: np.ndarray
    on: np.ndarray
    reached: np.ndarray


def recall_parts(real, fake, k: int = 3, chunk: int = CHUNK) -> RecallParts:
    real, fake = _pair(real, fake)
    r_real, r_fake = knn_radii(real, k, chunk), knn_radii(fake, k, chunk)
    return RecallParts(r_real, r_fake, inside_any_ball(fake, real, r_real, chunk),
                       inside_any_ball(real, fake, r_fake, chunk))


def recall_breakdown(real, fake, k: int = 3, chunk: int = CHUNK, parts: RecallParts | None = None) -> dict:
    """Recall taken apart by which generated samples' balls reach the real set (Naeem et al. 2020's point: a
    generated outlier sits where generated samples are sparse, so its ball is wide and reaches real samples nothing
    resembles). Keys: `recall` and `off_manifold` (1 - precision) as `precision_recall`; `recall_on`, the fraction of
    real samples inside the ball of some generated sample that is itself inside the real manifold (radii from the
    whole generated set, as in recall); `recall_off_only` = recall - recall_on; `radius_ratio`, the median generated
    k-NN radius over the median real one; `on_count`, how many generated samples are inside the real manifold.
    `parts`: `recall_parts(real, fake, k)` when the caller has it already."""
    real, fake = _pair(real, fake)
    r_real, r_fake, on, reached = recall_parts(real, fake, k, chunk) if parts is None else parts
    recall = float(reached.mean())
    recall_on = 0.0
    if on.any():   # not inside_any_ball: one on-manifold centre is a valid (if tiny) set of balls
        recall_on = float(np.concatenate([(d < r_fake[on][None, :]).any(axis=1)
                                          for _, d in _distance_rows(real, fake[on], chunk)]).mean())
    return dict(recall=recall, off_manifold=1.0 - float(on.mean()), recall_on=recall_on,
                recall_off_only=recall - recall_on, radius_ratio=float(np.median(r_fake) / np.median(r_real)),
                on_count=int(on.sum()))


def on_manifold(real, fake, k: int = 3, chunk: int = CHUNK) -> np.ndarray:
    """For each generated sample: is it inside the real manifold (precision's test, k-NN radii of the real set)?"""
    real, fake = _pair(real, fake)
    return inside_any_ball(fake, real, knn_radii(real, k, chunk), chunk)


def drawn_recall(real, fake, m: int, draws: int = 5, k: int = 3, seed: int = 0, chunk: int = CHUNK) -> list[float]:
    """Recall of m generated samples drawn without replacement (radii among the drawn ones), once per draw (draw d
    uses numpy's default_rng(seed + d)): recall at a common count, so sets of different sizes compare."""
    real, fake = _pair(real, fake)
    if not k < m <= len(fake):
        raise ValueError(f"drawing m={m} of {len(fake)} generated samples needs {k} < m <= {len(fake)} (k={k})")
    out = []
    for d in range(draws):
        drawn = fake[np.random.default_rng(seed + d).choice(len(fake), m, replace=False)]
        out.append(float(inside_any_ball(real, drawn, knn_radii(drawn, k, chunk), chunk).mean()))
    return out


def recall_by_rarity(real, fake, k: int = 3, bins: int = 4, chunk: int = CHUNK,
                     parts: RecallParts | None = None) -> list[float]:
    """Recall within each of `bins` equal-count groups of the real samples ordered by their own k-NN radius (among
    the real set): the first group the commonest (densest), the last the rarest; radii of the generated balls as in
    recall. A generator that drops the tails of the data loses recall in the last groups first. `parts` as in
    `recall_breakdown`."""
    if not 1 <= bins <= len(real):
        raise ValueError(f"bins must be 1..{len(real)}, got {bins}")
    r_real, _, _, reached = recall_parts(real, fake, k, chunk) if parts is None else parts
    order = np.argsort(r_real, kind="stable")
    return [float(reached[group].mean()) for group in np.array_split(order, bins)]
