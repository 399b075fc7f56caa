"""The FID Inception network: TensorFlow's 2015-12-05 Inception-v3 ported to torch, pool3 features (2048-d).

FID numbers are comparable across papers only with this exact network: its weights are the
TF graph of Heusel et al.'s FID code, ported to torch by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`, the same file clean-fid's legacy mode uses).
torchvision's `Inception3` has the same layers and parameter names, but TF's graph differs
in three places, rebuilt here:
- every 3x3 average pool in a branch excludes the zero padding from its average
  (TF's `avg_pool` with SAME padding; torch's default counts the padding);
- the last block (Mixed_7c) pools its pool branch with a 3x3 max pool, not an average;
- the classifier has 1008 outputs (unused here: features are taken before it).
Input: images in [0, 1]; they are resized to 299 x 299 (antialiased bicubic, the filter
clean-fid's "clean" mode uses, so large SDXL images are not aliased) and scaled to [-1, 1].
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from dmd2.families.base import ModelLoadError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_SHA256_PREFIX = "6726825d"     # torch.hub's convention: the file name carries its hash prefix
INPUT_SIZE = 299
FEATURE_DIM = 2048


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class TFInceptionA(InceptionA):
    """Mixed_5b..5d with TF's average pool (padding excluded)."""

    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))]


class TFInceptionC(InceptionC):
    """Mixed_6b..6e with TF's average pool (padding excluded)."""

    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))]


class TFInceptionE(InceptionE):
    """Mixed_7b (average pool, padding excluded) and Mixed_7c (max pool) as in TF's graph."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__(in_channels)
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool_no_pad(x) if self.pool == "avg" else _max_pool(x)
        return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]


class FIDInception(nn.Module):
    """Images in [0, 1] (N x 3 x H x W, any size) -> pool3 features (N x 2048)."""

    def __init__(self):
        super().__init__()
        net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = TFInceptionA(192, 32), TFInceptionA(256, 64), TFInceptionA(288, 64)
        net.Mixed_6b, net.Mixed_6c = TFInceptionC(768, 128), TFInceptionC(768, 160)
        net.Mixed_6d, net.Mixed_6e = TFInceptionC(768, 160), TFInceptionC(768, 192)
        net.Mixed_7b, net.Mixed_7c = TFInceptionE(1280, pool="avg"), TFInceptionE(2048, pool="max")
        self.net = net.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", align_corners=False, antialias=True)
        x = 2 * x - 1
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def default_weights_path() -> Path:
    """Where the weights are looked for by default: torch.hub's checkpoint folder ($TORCH_HOME), as pytorch-fid stores them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def _missing(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(
        f"FID Inception weights {why}: {path}. Download {WEIGHTS_URL} (91 MB) on a machine with internet and "
        f"put it at {default_weights_path()} (or pass its path with --inception-weights)")


def _sha256_prefix(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[: len(WEIGHTS_SHA256_PREFIX)]


def load_fid_inception(path=None, download: bool = True, device="cpu") -> FIDInception:
    """The FID Inception with the TF-ported weights from `path` (default: `default_weights_path()`).

    With no `path` and no file at the default place, the file is downloaded there when `download`
    (and the network allow); otherwise ModelLoadError says exactly what to download and where to put it.
    """
    explicit = path is not None
    path = Path(os.path.expanduser(str(path))) if explicit else default_weights_path()
    if not path.is_file():
        if explicit:
            raise _missing(path, "not found")
        if not download:
            raise _missing(path, "not found")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path), hash_prefix=None, progress=False)
        except Exception as e:
            path.unlink(missing_ok=True)
            raise _missing(path, f"not found and could not be downloaded ({type(e).__name__})") from None
    if path.name == WEIGHTS_FILE and _sha256_prefix(path) != WEIGHTS_SHA256_PREFIX:
        raise _missing(path, "file is damaged (its SHA-256 does not start with 6726825d); delete it")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not read FID Inception weights {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    model = FIDInception()
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    try:
        result = model.net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelLoadError(f"{path} is not the FID Inception: {str(e).strip().splitlines()[-1]}") from None
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ModelLoadError(f"{path} is not the FID Inception: {len(missing)} missing keys {missing[:3]}, "
                             f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]}")
    return model.to(device)
