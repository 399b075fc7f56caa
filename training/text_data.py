"""Data of the text-to-image families: captioned real images (as cached VAE latents) and the generator's prompts.

Real images: a folder in the Hugging Face imagefolder layout (images + `metadata.jsonl` with
`file_name` and `text` per line) or `hf:<dataset>[:<split>]` (needs the `datasets` package).
Prompts: a `.txt` file (one a line) or a `.parquet` file (a prompt/text/caption column; needs pyarrow).
Latents: the VAE encodes every real image once, into `<cache_dir>/latents-<key>.pt`, where the key
hashes the images, the captions, the VAE's config and weights and the resolution.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dmd2.prompts import read_prompts as dmd2_read_prompts
from training.data import IMAGE_SUFFIXES, DataError

TEXT_COLUMNS = ("text", "caption", "prompt")
CACHE_VERSION = 1


@dataclass
class CaptionedImages:
    """A list of real images with captions; `load(i)` opens image i (a PIL image)."""

    name: str
    fingerprint: str               # changes whenever an image or caption changes
    captions: list[str]
    load: Callable[[int], Image.Image]

    def __len__(self) -> int:
        return len(self.captions)


def _caption(record: dict, where: str) -> str:
    for key in TEXT_COLUMNS:
        if isinstance(record.get(key), str):
            return record[key]
    raise DataError(f"{where}: no caption (expected a string under one of {', '.join(TEXT_COLUMNS)})")


def image_folder(root) -> CaptionedImages:
    """Images + metadata.jsonl ({"file_name": ..., "text": ...} per line), the imagefolder layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (for a Hugging Face dataset write hf:<name>)")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{root} has no metadata.jsonl: the text families need captions, one JSON line per image "
                        f'like {{"file_name": "0001.png", "text": "a photo of a cat"}}')
    files, captions, digest = [], [], hashlib.sha256(meta.read_bytes())
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{meta} line {n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not JSON: {e}") from None
        if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
            raise DataError(f"{where}: no file_name")
        path = root / record["file_name"]
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{where}: {record['file_name']} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if not path.is_file():
            raise DataError(f"{where}: image {path} not found")
        stat = path.stat()
        digest.update(f"{record['file_name']}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        files.append(path)
        captions.append(_caption(record, where))
    if not files:
        raise DataError(f"{meta} lists no images")

    def load(i: int) -> Image.Image:
        try:
            with Image.open(files[i]) as im:
                return im.convert("RGB")
        except OSError as e:
            raise DataError(f"cannot read image {files[i]}: {e}") from None

    return CaptionedImages(str(root), digest.hexdigest(), captions, load)


def hf_dataset(spec: str) -> CaptionedImages:
    """`hf:<dataset>[:<split>]` through the `datasets` package: an image column and a text/caption/prompt column."""
    name, _, split = spec.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"data {spec!r} needs the `datasets` package (pip install datasets), or use a folder of "
                        f"images with metadata.jsonl") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise DataError(f"could not load the Hugging Face dataset {name!r}: {type(e).__name__}: {e}") from None
    image_col = next((c for c in ("image", "img", "jpg", "png") if c in ds.column_names), None)
    text_col = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if image_col is None or text_col is None:
        raise DataError(f"dataset {name!r} needs an image column and a {'/'.join(TEXT_COLUMNS)} column; "
                        f"it has {ds.column_names}")
    captions = [str(c) for c in ds[text_col]]
    return CaptionedImages(spec, f"{name}:{split}:{ds._fingerprint}", captions,
                           lambda i: ds[i][image_col].convert("RGB"))


def captioned_images(spec: str) -> CaptionedImages:
    """A folder path or `hf:<dataset>[:<split>]`."""
    return hf_dataset(spec) if spec.startswith("hf:") else image_folder(spec)


def read_prompts(path) -> list[str]:
    """The generator's prompts (dmd2.prompts.read_prompts: .txt one per line, or .parquet), errors as DataError."""
    try:
        return dmd2_read_prompts(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> (3, res, res) in [-1, 1]: shorter side resized to `resolution`, then a centre crop."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's config (if any) and every weight's bytes."""
    digest = hashlib.sha256(json.dumps(dict(getattr(module, "config", {})), sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _valid_cache(obj, key: str, n: int, shape: tuple[int, ...]) -> str | None:
    """None if `obj` is the cache we expect, else what is wrong with it."""
    if not isinstance(obj, dict) or obj.get("version") != CACHE_VERSION:
        return "not a latent cache of this version"
    if obj.get("key") != key:
        return "made from other images, VAE or resolution"
    latents, captions = obj.get("latents"), obj.get("captions")
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (n, *shape):
        return f"latents of shape {getattr(latents, 'shape', None)}, expected {(n, *shape)}"
    if not isinstance(captions, list) or len(captions) != n:
        return "caption count differs from the latent count"
    return None


@torch.no_grad()
@contextlib.contextmanager
def fp32_vae(family):
    """Inside, `family.vae` is the VAE in fp32: as it is, or (frozen_dtype bf16/fp16) reloaded in fp32 from the
    family's source, so that latents are encoded at full precision whatever the frozen parts' dtype."""
    from diffusers import AutoencoderKL

    from dmd2.families.sd_loading import load_part

    vae = family.vae
    if next(vae.parameters()).dtype == torch.float32:
        yield vae
        return
    family.vae = load_part(AutoencoderKL, family.source, subfolder="vae", dtype=torch.float32,
                           **family.load_kwargs).to(family.device).eval().requires_grad_(False)
    try:
        yield family.vae
    finally:
        family.vae = vae


def cached_latents(family, images: CaptionedImages, resolution: int, cache_dir, batch_size: int = 8,
                   log: Callable[[str], None] = print) -> tuple[torch.Tensor, list[str]]:
    """(latents (N, C, h, w) float16, captions): from the cache when it matches, else encoded once and saved.

    The VAE encodes in fp32 whatever the family's dtype (as the official code, which keeps the SDXL VAE in
    fp32 and stores its latents in fp16): `frozen_dtype: bf16` changes neither the latents nor the cache key.

    A cache that cannot be read or does not match (other images, VAE, resolution, shape) is rebuilt.
    The returned latents are memory-mapped from the cache file, so big datasets need not fit in RAM.
    """
    with fp32_vae(family):
        return _cached_latents(family, images, resolution, cache_dir, batch_size, log)


def _cached_latents(family, images, resolution, cache_dir, batch_size, log):
    shape = tuple(family.latent_shape(1)[1:])
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "data": images.fingerprint, "captions": images.captions,
                                     "vae": module_fingerprint(family.vae), "resolution": resolution,
                                     "shape": shape}).encode()).hexdigest()
    path = Path(os.path.expanduser(str(cache_dir))) / f"latents-{key[:20]}.pt"
    if path.is_file():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            problem = _valid_cache(obj, key, len(images), shape)
        except Exception as e:  # truncated or foreign files raise several types
            problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            return obj["latents"], obj["captions"]
        log(f"latent cache {path} is {problem}: rebuilding it")
    log(f"encoding {len(images)} images of {images.name} at {resolution}px into {path}")
    gen = torch.Generator().manual_seed(0)  # the posterior sample of each image is reproducible
    latents = torch.empty(len(images), *shape, dtype=torch.float16)
    for start in range(0, len(images), batch_size):
        idx = range(start, min(start + batch_size, len(images)))
        batch = torch.stack([to_tensor(images.load(i), resolution) for i in idx])
        latents[start:start + len(idx)] = family.encode(batch, generator=gen).half().cpu()
    if not torch.isfinite(latents).all():
        raise DataError(f"the VAE gave non-finite latents for {images.name} (an fp16 VAE overflow? use frozen_dtype "
                        f"fp32 or a fp16-safe VAE)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"version": CACHE_VERSION, "key": key, "latents": latents, "captions": list(images.captions),
                "data": images.name, "resolution": resolution}, tmp)
    os.replace(tmp, path)
    return latents, list(images.captions)
