"""More than one instrument for MNIST samples: FID in a second, independently trained feature space
(the digit autoencoder), and KID, precision/recall and density/coverage in both feature spaces.

Keys: `<space>_<measure>` with space `classifier` (assets/mnist/classifier, whose FID is the plain `fid`
of dmd2.metrics.mnist) or `autoencoder` (assets/mnist/autoencoder); measures `fid` (autoencoder only),
`kid` and `kid_std` (mean and standard deviation over subsets), `precision`, `recall` (k=3), `density`,
`coverage` (k=5). All against the 5,000 real digits.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

from dmd2.metrics.frechet import feature_stats, frechet_distance
from dmd2.metrics.kid import kid
from dmd2.metrics.mnist import _to_tensor, default_classifier, real_digits
from dmd2.metrics.mnist_autoencoder import DigitAutoencoder, load_autoencoder
from dmd2.metrics.neighbours import density_coverage, precision_recall

PR_K, DC_K = 3, 5                        # neighbours: Kynkaanniemi et al. 2019 use 3, Naeem et al. 2020 use 5
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0

_lock = threading.Lock()
_default: list[DigitAutoencoder] = []
_real: "weakref.WeakKeyDictionary[torch.nn.Module, np.ndarray]" = weakref.WeakKeyDictionary()


def default_autoencoder() -> DigitAutoencoder:
    """The committed autoencoder under assets/mnist/autoencoder (loaded once; ModelLoadError when missing)."""
    with _lock:
        if not _default:
            _default.append(load_autoencoder())
        return _default[0]


@torch.no_grad()
def embed(net: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """`net.features` of every image, float64, in batches."""
    return np.concatenate([net.features(x[i:i + batch]).double().numpy() for i in range(0, len(x), batch)])


def real_features(net: torch.nn.Module) -> np.ndarray:
    """Features of the 5,000 real digits (computed once per network)."""
    with _lock:
        if net not in _real:
            _real[net] = embed(net, _to_tensor(real_digits()[0]))
        return _real[net]


def neighbour_measures(real: np.ndarray, fake: np.ndarray) -> dict:
    """Precision/recall (k = PR_K) and density/coverage (k = DC_K) of `fake` features against `real` ones;
    precision and recall are None when there are too few generated samples for k-NN radii (k or fewer)."""
    precision, recall = precision_recall(real, fake, PR_K) if len(fake) > PR_K else (None, None)
    density, coverage = density_coverage(real, fake, DC_K)
    return dict(precision=precision, recall=recall, density=density, coverage=coverage)


def compare_features(real: np.ndarray, fake: np.ndarray) -> dict:
    """KID (mean, std) and the neighbour measures of `fake` features against `real` ones."""
    mean, std = kid(real, fake, KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED)
    return dict(kid=mean, kid_std=std, **neighbour_measures(real, fake))


def evaluate_independent(images_uint8, classifier=None, autoencoder=None) -> dict:
    """The measures above for uint8 images (N x 32 x 32 x 1 or 28 px), N >= 2; keys `<space>_<measure>`."""
    x = _to_tensor(images_uint8)
    if len(x) < 2:
        raise ValueError(f"need at least 2 images, got {len(x)}")
    spaces = {"classifier": (default_classifier() if classifier is None else classifier).eval(),
              "autoencoder": (default_autoencoder() if autoencoder is None else autoencoder).eval()}
    out = {}
    for name, net in spaces.items():
        real, fake = real_features(net), embed(net, x)
        scores = compare_features(real, fake)
        if name != "classifier":  # the classifier's FID is `fid` (dmd2.metrics.mnist), computed there
            scores = dict(fid=frechet_distance(*feature_stats(fake), *feature_stats(real)), **scores)
        out.update({f"{name}_{k}": v for k, v in scores.items()})
    return out
