"""Frechet distance between Gaussians fitted to features (the FID formula), computed carefully."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, float64) covariance of an N x D feature array."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an N x D feature array with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Matrix square root and its relative residual ||X X - A|| / ||A|| (inf when it failed)."""
    try:
        with warnings.catch_warnings():  # singularity is detected from the residual below
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm(a)
    except (np.linalg.LinAlgError, ValueError):
        return np.full_like(a, np.nan), np.inf
    if not np.isfinite(root).all():
        return root, np.inf
    scale = max(np.linalg.norm(a), np.finfo(np.float64).tiny)
    return root, float(np.linalg.norm(root @ root - a) / scale)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, max_imag: float = 1e-3) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (Dowson & Landau 1982)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("means or covariances contain NaN or inf")
    covmean, residual = _sqrtm(s1 @ s2)
    if residual > 1e-5:
        # S1 S2 is (near-)singular: the Schur square root is unreliable, so offset both
        # covariances by eps * I (as pytorch-fid does) and take the root again.
        offset = eps * max(1.0, np.abs(np.diag(s1)).mean(), np.abs(np.diag(s2)).mean()) * np.eye(d)
        covmean, residual = _sqrtm((s1 + offset) @ (s2 + offset))
        if not np.isfinite(residual):
            raise ValueError("matrix square root of the covariance product failed even with an eps*I offset")
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > max_imag * max(1.0, np.abs(covmean.real).max()):
            raise ValueError(f"matrix square root has a large imaginary component ({imag:.3g}); "
                             "are the covariances symmetric positive semi-definite?")
        covmean = covmean.real
    diff = mu1 - mu2
    dist = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(max(dist, 0.0))  # tiny negatives are round-off of a squared distance
