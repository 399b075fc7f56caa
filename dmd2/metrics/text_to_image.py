"""Text-to-image metrics: FID, patch FID and CLIP score, accumulated batch by batch.

- FID: Inception pool3 features of whole images (resized to 299 by the network) against a
  folder of reference images (e.g. COCO-2014 validation images for its captions).
- Patch FID: the same features of the 299 x 299 centre crop of each full-resolution image,
  with no resize, on both sides; DMD2's SDXL evaluation uses it to see fine detail that the
  downsampling to 299 hides.
- CLIP score: `dmd2.metrics.clip_score`.
10,000 SDXL images are 31 GB as uint8, so nothing keeps them: `TextToImageMetrics.add` turns
each batch into features and scores, and `result` fits the Gaussians at the end.
The feature network is any module taking float images in [0, 1] (N x 3 x H x W) to N x D
features: the FID Inception (`dmd2.metrics.inception`) for real numbers, a small one in tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dmd2.metrics.frechet import feature_stats, frechet_distance

PATCH_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def center_crop(images: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """The size x size centre of each image (N x H x W x C): rows from (H - size) // 2, columns likewise."""
    n, h, w = images.shape[:3]
    if h < size or w < size:
        raise ValueError(f"patch FID needs images of at least {size} x {size} pixels, got {h} x {w}")
    top, left = (h - size) // 2, (w - size) // 2
    return images[:, top:top + size, left:left + size]


def _check_rgb(images) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {a.dtype} {a.shape}")
    return a


@torch.no_grad()
def image_features(images_uint8, net, batch_size: int = 32, device="cpu") -> np.ndarray:
    """uint8 N x H x W x 3 -> float64 N x D features of `net` (inputs in [0, 1])."""
    a = _check_rgb(images_uint8)
    out = []
    for i in range(0, len(a), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(a[i:i + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        out.append(net(x.to(device)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


class TextToImageMetrics:
    """Accumulates Inception features (whole images and centre patches) and CLIP scores over batches."""

    def __init__(self, feature_net=None, clip=None, patch_size: int | None = PATCH_SIZE, batch_size: int = 32,
                 device="cpu"):
        self.feature_net, self.clip = feature_net, clip
        self.patch_size, self.batch_size, self.device = patch_size, batch_size, device
        self.features: list[np.ndarray] = []
        self.patch_features: list[np.ndarray] = []
        self.clip_scores: list[np.ndarray] = []
        self.n = 0
        self.patch_skipped: str | None = None   # why patch FID is not computed, if it is not

    def add(self, images_uint8, prompts=None) -> None:
        """One batch: its features, its centre-patch features (when the images are big enough), its CLIP scores."""
        a = _check_rgb(images_uint8)
        if self.feature_net is not None:
            self.features.append(image_features(a, self.feature_net, self.batch_size, self.device))
            if self.patch_size:
                if min(a.shape[1:3]) >= self.patch_size:
                    self.patch_features.append(image_features(center_crop(a, self.patch_size), self.feature_net,
                                                              self.batch_size, self.device))
                else:
                    self.patch_skipped = (f"images of {a.shape[1]} x {a.shape[2]} are smaller than the "
                                          f"{self.patch_size} x {self.patch_size} patch")
        if self.clip is not None:
            if prompts is None:
                raise ValueError("CLIP score needs the prompts of the images")
            self.clip_scores.append(self.clip.scores(a, prompts))
        self.n += len(a)

    def stats(self) -> dict:
        """Mean and covariance of the features seen so far (and of the patches, if any)."""
        out = {}
        if self.features:
            out["mu"], out["sigma"] = feature_stats(np.concatenate(self.features))
        if self.patch_features and not self.patch_skipped:
            out["patch_mu"], out["patch_sigma"] = feature_stats(np.concatenate(self.patch_features))
        return out

    def result(self, reference: dict | None = None) -> dict:
        """fid / patch_fid against `reference` (a `stats()` dict of real images; None: not computed), clip_score."""
        out: dict = {"n": self.n}
        if reference is not None and self.feature_net is not None:
            mine = self.stats()
            out["fid"] = frechet_distance(mine["mu"], mine["sigma"], reference["mu"], reference["sigma"])
            if "patch_mu" in mine and "patch_mu" in reference:
                out["patch_fid"] = frechet_distance(mine["patch_mu"], mine["patch_sigma"], reference["patch_mu"],
                                                    reference["patch_sigma"])
            else:
                out["patch_fid"] = None
                out["patch_fid_skipped"] = self.patch_skipped or "reference images are smaller than the patch"
        if self.clip_scores:
            scores = np.concatenate(self.clip_scores)
            out["clip_score"] = float(scores.mean())
            out["clip_score_std"] = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        return out


def image_files(folder) -> list[Path]:
    """Image files directly in `folder` (png, jpg, jpeg, webp, bmp), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def iter_image_batches(files, batch_size: int = 32) -> Iterator[np.ndarray]:
    """uint8 RGB batches of the files; images of different sizes go in batches of one size each."""
    from PIL import Image

    batch: list[np.ndarray] = []
    for path in files:
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        if batch and (img.shape != batch[0].shape or len(batch) == batch_size):
            yield np.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield np.stack(batch)


def reference_stats(folder, feature_net, limit: int | None = None, patch_size: int | None = PATCH_SIZE,
                    batch_size: int = 32, device="cpu") -> dict:
    """Feature statistics of the reference images in `folder` (the first `limit`, by name), with their count."""
    files = image_files(folder)[:limit]
    if len(files) < 2:
        raise ValueError(f"FID needs at least 2 reference images, {folder} has {len(files)}")
    acc = TextToImageMetrics(feature_net, None, patch_size, batch_size, device)
    for batch in iter_image_batches(files, batch_size):
        acc.add(batch)
    return dict(acc.stats(), n=acc.n)


def evaluate_text_model(model, prompts: list[str], metrics: TextToImageMetrics, reference: dict | None = None,
                        seed: int = 0, steps=None, guidance=None, batch_size: int = 8, autocast: bool = False,
                        progress=None, handover: dict | None = None) -> dict:
    """Sample one image per prompt (batch b from seed + b), feed each batch to `metrics`, return the scores
    with NFE and ms per image. `model` is a registry text model (anything with `generate(prompts=...)`);
    `handover`: {"teacher_until": T, "teacher_steps": N, "teacher_guidance": W} for a teacher-then-student sample."""
    seconds, nfe = 0.0, None
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        out = model.generate(prompts=batch, seed=seed + b, steps=steps, guidance=guidance, autocast=autocast,
                             **(handover or {}))
        metrics.add(out.images, batch)
        seconds += out.seconds
        nfe = out.nfe
        if progress is not None:
            progress(start + len(batch), len(prompts))
    result = {"nfe": nfe, "ms_per_image": 1000 * seconds / max(len(prompts), 1)}
    result.update(metrics.result(reference))
    return result
