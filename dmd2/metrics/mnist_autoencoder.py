"""A small convolutional digit autoencoder whose bottleneck is our second, independent MNIST feature space.

Why an autoencoder: the first feature space (mnist_net.MnistClassifier) is trained on labels, so it keeps
what tells digits apart and may ignore the rest (stroke width, blur, speckle, style within a class). An
autoencoder is trained without labels to reconstruct every pixel, so its code must keep the appearance a
classifier may drop; its architecture differs too (strided convolutions, no BatchNorm, no pooling). A flaw
that one feature space hides is then less likely to be hidden by the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dmd2.families.base import ModelLoadError

DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "assets" / "mnist" / "autoencoder"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
ARCHITECTURE = "DigitAutoencoder"


class DigitAutoencoder(nn.Module):
    """Strided conv encoder (32 -> 4 px) to a latent_dim code, transposed-conv decoder back. Input in [-1, 1]."""

    def __init__(self, widths=(16, 32, 64), latent_dim: int = 64, in_channels: int = 1, image_size: int = 32):
        super().__init__()
        self.config = dict(architecture=ARCHITECTURE, widths=list(widths), latent_dim=latent_dim,
                           in_channels=in_channels, image_size=image_size)
        enc, c = [], in_channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.SiLU()]
            c = w
        self.side = image_size // 2 ** len(widths)
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(c * self.side ** 2, latent_dim))
        dec = []
        for w in list(widths[-2::-1]) + [in_channels]:
            dec += [nn.ConvTranspose2d(c, w, 4, stride=2, padding=1), nn.SiLU()]
            c = w
        self.expand = nn.Sequential(nn.Linear(latent_dim, widths[-1] * self.side ** 2), nn.SiLU())
        self.decoder = nn.Sequential(*dec[:-1], nn.Tanh())  # the last layer outputs pixels in [-1, 1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The latent code, N x latent_dim (the feature space of the metrics)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images N x C x H x W in [-1, 1] from codes."""
        return self.decoder(self.expand(z).unflatten(1, (-1, self.side, self.side)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x`."""
        return self.decode(self.features(x))


def save_autoencoder(model: DigitAutoencoder, path) -> Path:
    """Write model.safetensors + config.json into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")
    return path


def load_autoencoder(path=DEFAULT_PATH) -> DigitAutoencoder:
    """Load the autoencoder (eval mode, frozen) from a folder; ModelLoadError names the missing or bad file."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"feature autoencoder folder not found: {path} "
                             f"(train one: python -m training feature-net --out {path})")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ModelLoadError(f"feature autoencoder file missing: {path / name}")
    try:
        config = json.loads((path / CONFIG).read_text())
        if not isinstance(config, dict) or config.pop("architecture", None) != ARCHITECTURE:
            raise ValueError(f"architecture is not {ARCHITECTURE!r}")
        model = DigitAutoencoder(**config)
    except (json.JSONDecodeError, TypeError, ValueError, OSError) as e:
        raise ModelLoadError(f"bad feature autoencoder config {path / CONFIG}: {type(e).__name__}: {e}") from None
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"could not load feature autoencoder weights {path / WEIGHTS}: "
                             f"{type(e).__name__}: {msg}") from None
    return model.eval().requires_grad_(False)
