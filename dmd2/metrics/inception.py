"""The FID Inception network: TensorFlow's 2015-12-05 Inception-v3 ported to torch, pool3 features (2048-d).

FID numbers are comparable across papers only with this exact network: its weights are the
TF graph of Heusel et al.'s FID code, ported to torch by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`, the same file clean-fid's legacy mode uses).
The network is pytorch-fid's: torchvision's `Inception3` with `pytorch_fid.inception`'s FID
blocks, which rebuild the three places where TF's graph differs (3x3 average pools exclude the
zero padding; Mixed_7c max-pools its pool branch; 1008 classes, unused here).
What stays ours, and why:
- the assembly in `FIDInception` is `pytorch_fid.inception.fid_inception_v3()` without its
  download: that function, and `InceptionV3()` which calls it, always load `FID_WEIGHTS_URL`
  through torch.hub (its cache or the network) and take no file path, while `--inception-weights`
  names any file. tests/test_t2i_metrics.py checks that we give `InceptionV3`'s features exactly;
- the resize: images in [0, 1] go to 299 x 299 with an antialiased bicubic filter (the filter of
  clean-fid's "clean" mode, so large SDXL images are not aliased), then to [-1, 1]. pytorch-fid
  resizes bilinearly without antialiasing; torch-fidelity and torchmetrics (which do take a
  weights path) accept only uint8, resize with TF1's bilinear and scale by (x - 128) / 128, so
  their features differ from these; clean-fid's "clean" network is another file (NVIDIA's
  TorchScript `inception-2015-12-05.pt`) and its legacy one is pytorch-fid's, downloaded likewise.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_fid.inception import FID_WEIGHTS_URL, FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
from torch import nn
from torchvision.models.inception import Inception3

from dmd2.families.base import ModelLoadError

WEIGHTS_URL = FID_WEIGHTS_URL                   # pytorch-fid's release of the file
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[-1]   # pt_inception-2015-12-05-6726825d.pth
WEIGHTS_SHA256_PREFIX = "6726825d"              # torch.hub's convention: the file name carries its hash prefix
INPUT_SIZE = 299
FEATURE_DIM = 2048


class FIDInception(nn.Module):
    """Images in [0, 1] (N x 3 x H x W, any size) -> pool3 features (N x 2048)."""

    def __init__(self):
        super().__init__()
        net = Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
        net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
        net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
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
