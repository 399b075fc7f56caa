"""A small convolutional digit autoencoder whose bottleneck is our second, independent MNIST feature space.

Why an autoencoder: the first feature space (mnist_net.MnistClassifier) is trained on labels, so it keeps
what tells digits apart and may ignore the rest (stroke width, blur, speckle, style within a class). An
autoencoder is trained without labels to reconstruct every pixel, so its code must keep the appearance a
classifier may drop; its architecture differs too (strided convolutions, no BatchNorm, no pooling). A flaw
that one feature space hides is then less likely to be hidden by the other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dmd2.metrics.mnist_net import load_net, save_net

DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "assets" / "mnist" / "autoencoder"
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
    return save_net(model, path)


def load_autoencoder(path=DEFAULT_PATH) -> DigitAutoencoder:
    """Load the autoencoder (eval mode, frozen) from a folder; ModelLoadError names the missing or bad file."""
    return load_net(DigitAutoencoder, path, "feature autoencoder", "python -m training feature-net")
