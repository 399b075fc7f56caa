"""A small CNN digit classifier whose penultimate layer is the feature space of our MNIST FID."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dmd2.families.base import ModelLoadError

DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "assets" / "mnist" / "classifier"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
ARCHITECTURE = "MnistClassifier"


class MnistClassifier(nn.Module):
    """conv-BN-ReLU-pool x3 (32 -> 4 px), a linear embedding, then 10 logits. Input: N x 1 x 32 x 32 in [-1, 1]."""

    def __init__(self, widths=(32, 64, 128), feature_dim: int = 128, num_classes: int = 10,
                 in_channels: int = 1, image_size: int = 32, dropout: float = 0.3):
        super().__init__()
        self.config = dict(architecture=ARCHITECTURE, widths=list(widths), feature_dim=feature_dim,
                           num_classes=num_classes, in_channels=in_channels, image_size=image_size, dropout=dropout)
        layers, c = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.conv = nn.Sequential(*layers)
        side = image_size // 2 ** len(widths)
        self.embed = nn.Linear(c * side * side, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding (before its ReLU), N x feature_dim."""
        return self.embed(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, N x num_classes."""
        return self.head(self.features(x))


def save_net(model: nn.Module, path) -> Path:
    """Write a feature network's model.safetensors + config.json (its `config`, with its architecture) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps(model.config, indent=2) + "\n")
    return path


def load_net(cls, path, what: str, train_command: str) -> nn.Module:
    """A feature network of class `cls` (eval mode, frozen) from a `save_net` folder; ModelLoadError names the
    missing or bad file, calling the network `what` and saying how to train one."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{what} folder not found: {path} (train one: {train_command} --out {path})")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ModelLoadError(f"{what} file missing: {path / name}")
    try:
        config = json.loads((path / CONFIG).read_text())
        if not isinstance(config, dict) or config.pop("architecture", None) != cls.__name__:
            raise ValueError(f"architecture is not {cls.__name__!r}")
        model = cls(**config)
    except (json.JSONDecodeError, TypeError, ValueError, OSError) as e:
        raise ModelLoadError(f"bad {what} config {path / CONFIG}: {type(e).__name__}: {e}") from None
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ModelLoadError(f"could not load {what} weights {path / WEIGHTS}: {type(e).__name__}: {msg}") from None
    return model.eval().requires_grad_(False)


def save_classifier(model: MnistClassifier, path) -> Path:
    """Write model.safetensors + config.json into `path`."""
    return save_net(model, path)


def load_classifier(path=DEFAULT_PATH) -> MnistClassifier:
    """Load the classifier (eval mode, frozen) from a folder; ModelLoadError names the bad file."""
    return load_net(MnistClassifier, path, "classifier", "python -m training.classifier")
