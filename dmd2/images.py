"""Image helpers shared by the registry, the CLI and the trainer."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], N x C x H x W -> uint8 N x H x W x C."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path, cols: int = 10) -> None:
    """uint8 N x H x W x C -> one PNG, `cols` images per row.

    Written to a temporary file and renamed, so a reader (the Train tab) never sees half a PNG;
    the folder is created if missing.
    """
    from PIL import Image

    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, img in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
