"""Kernel inception distance (Binkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel, over subsets."""

from __future__ import annotations

import numpy as np


def _features(name: str, a) -> np.ndarray:
    """`a` as a finite float64 N x D array, or ValueError naming `name`."""
    f = np.asarray(a, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: need an N x D feature array with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return f


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / d + 1)^3 for every pair of rows, in float64."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD^2 between two feature sets under the cubic polynomial kernel (diagonals left out)."""
    x, y = _features("x", x), _features("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kid(x, y, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation (ddof 0) of the unbiased MMD^2 over `subsets` random subset pairs.

    Each subset draws min(subset_size, len(x), len(y)) rows of each set without replacement, with a
    generator seeded by `seed`, so a result is reproducible."""
    x, y = _features("x", x), _features("y", y)
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"subset size must be at least 2, got {size}")
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(x[rng.choice(len(x), size, replace=False)],
                                     y[rng.choice(len(y), size, replace=False)]) for _ in range(subsets)])
    return float(values.mean()), float(values.std())
