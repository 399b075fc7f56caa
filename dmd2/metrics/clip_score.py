"""CLIP score: 100 * max(cos(image, prompt), 0) in an open_clip model's joint embedding, averaged over pairs.

DMD2 (like GigaGAN and most SDXL distillation papers) reports it with open_clip's ViT-g-14
trained on LAION-2B (`laion2b_s12b_b42k`); that is the default here. Images go through the
model's own eval preprocessing (resize the short side with bicubic, centre crop, normalise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dmd2.families.base import ModelLoadError
from dmd2.hub import cached_file, hub_reachable

CLIP_MODEL = "ViT-g-14"
CLIP_PRETRAINED = "laion2b_s12b_b42k"
CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")   # what open_clip looks for, in order


class ClipScorer:
    """An open_clip-style model (encode_image / encode_text), its image preprocessing and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, device="cpu", batch_size: int = 32):
        self.model = model.eval().requires_grad_(False) if hasattr(model, "eval") else model
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def image_embeddings(self, images_uint8) -> torch.Tensor:
        """uint8 N x H x W x 3 -> unit-norm embeddings (float32, N x D)."""
        from PIL import Image

        a = np.asarray(images_uint8)
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {a.dtype} {a.shape}")
        out = []
        for i in range(0, len(a), self.batch_size):
            x = torch.stack([self.preprocess(Image.fromarray(img)) for img in a[i:i + self.batch_size]])
            out.append(self.model.encode_image(x.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts) -> torch.Tensor:
        """Prompts -> unit-norm embeddings (float32, N x D); the tokenizer truncates at its context length."""
        prompts = list(prompts)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[i:i + self.batch_size])
            out.append(self.model.encode_text(tokens.to(self.device)).float())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    def scores(self, images_uint8, prompts) -> np.ndarray:
        """Per pair: 100 * max(cos(image_i, prompt_i), 0)."""
        prompts = list(prompts)
        if len(prompts) != len(images_uint8) or not prompts:
            raise ValueError(f"need one prompt per image and at least one pair: {len(images_uint8)} images, "
                             f"{len(prompts)} prompts")
        cos = (self.image_embeddings(images_uint8) * self.text_embeddings(prompts)).sum(-1)
        return (100.0 * cos.clamp(min=0)).double().numpy()


def clip_weights_file(weights=None, cache_dir=None) -> Path | None:
    """The weight file to use: `weights` (must exist), else the Hugging Face cache's copy, else None."""
    if weights is not None:
        path = Path(os.path.expanduser(str(weights)))
        if not path.is_file():
            raise ModelLoadError(f"CLIP weights not found: {path}")
        return path
    for name in CLIP_FILES:
        found = cached_file(CLIP_REPO, name, cache_dir=cache_dir)
        if found is not None:
            return found
    return None


def load_clip_scorer(weights=None, device=None, cache_dir=None, batch_size: int = 32) -> ClipScorer:
    """open_clip ViT-g-14 (laion2b_s12b_b42k) from `weights`, the Hugging Face cache, or the Hub.

    Offline with no local copy: ModelLoadError saying which file to download and how to pass it.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = clip_weights_file(weights, cache_dir)
    if path is None and not hub_reachable():
        raise ModelLoadError(
            f"CLIP score needs the open_clip {CLIP_MODEL} weights ({CLIP_PRETRAINED}, about 5.5 GB), which are "
            f"not in the Hugging Face cache, and the Hub is not reachable from here. On a machine with internet run "
            f"`hf download {CLIP_REPO} {CLIP_FILES[0]}` and pass that file with --clip-weights PATH")
    cfg = get_pretrained_cfg(CLIP_MODEL, CLIP_PRETRAINED)   # the tag's preprocessing, also for a file path
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            CLIP_MODEL, pretrained=str(path) if path is not None else CLIP_PRETRAINED, device=device,
            cache_dir=cache_dir, image_mean=cfg["mean"], image_std=cfg["std"],
            image_interpolation=cfg["interpolation"], image_resize_mode=cfg["resize_mode"])
    except Exception as e:
        raise ModelLoadError(f"could not load CLIP {CLIP_MODEL} ({path or CLIP_PRETRAINED}): {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(CLIP_MODEL), device, batch_size)
