"""Fidelity to the official DMD2 code (issue 17): the official GAN head on the real 1280-channel bottleneck,
latents cached from an fp32 VAE whatever frozen_dtype, the warm-up unit, the SD presets' settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_sd
from conftest import make_caption_folder
from dmd2.families.sdxl import SDXLFamily
from training.config import DistillConfig, load_config
from training.critic import OfficialGanHead, bottleneck_size
from training.text_data import cached_latents, captioned_images
from training.trainer import lr_factor

ROOT = Path(__file__).resolve().parent.parent


def convs(head: nn.Module) -> list[tuple]:
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) for m in head.modules()
            if isinstance(m, nn.Conv2d)]


def test_official_head_is_dmd2s_cls_pred_branch_for_sdxl_and_sd15():
    """SDXL at 1024 px (bottleneck 32x32): three 4x4 stride-2 convs, a 4x4 stride-4 conv, a 1x1 conv, as
    sdxl_guidance.py; SD1.5 at 512 px (8x8): one stride-2 conv, then the same tail, as sd_guidance.py."""
    with torch.device("meta"):
        sdxl, sd15 = OfficialGanHead(1280, 32), OfficialGanHead(1280, 8)
    down, last, logit = (1280, 1280, (4, 4), (2, 2), (1, 1)), (1280, 1280, (4, 4), (4, 4), (0, 0)), \
        (1280, 1, (1, 1), (1, 1), (0, 0))
    assert convs(sdxl) == [down, down, down, last, logit]
    assert convs(sd15) == [down, last, logit]
    norms = [m for m in sdxl.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 4 and all(m.num_groups == 32 and m.num_channels == 1280 for m in norms)


def test_official_head_on_a_real_size_bottleneck_gives_one_finite_logit_per_sample():
    torch.manual_seed(0)
    head = OfficialGanHead(1280, 8)  # SD1.5 at 512 px
    features = torch.randn(2, 1280, 8, 8, requires_grad=True)
    logits = head(features)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_bottleneck_size_of_the_real_unets():
    """The head's input side from the family's latent size and the UNet's downsamplers."""
    import json

    from diffusers import UNet2DConditionModel

    class Latents:  # the one Family method bottleneck_size reads
        def __init__(self, side):
            self.side = side

        def latent_shape(self, n):
            return (n, 4, self.side, self.side)

    for name, side, expected in (("sdxl-base", 128, 32), ("sd15", 64, 8)):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads((ROOT / f"configs/real_unets/{name}.json").read_text()))
        assert bottleneck_size(Latents(side), unet) == expected


def test_latent_cache_is_encoded_in_fp32_whatever_frozen_dtype(tmp_path):
    pipe = tiny_sd.make_tiny_sdxl(tmp_path / "sdxl")
    data = captioned_images(str(make_caption_folder(tmp_path / "data")))
    fp32 = SDXLFamily.from_pretrained(pipe, dtype=torch.float32)
    bf16 = SDXLFamily.from_pretrained(pipe, dtype=torch.bfloat16)
    a, _ = cached_latents(fp32, data, 16, tmp_path / "a", log=lambda m: None)
    b, _ = cached_latents(bf16, data, 16, tmp_path / "b", log=lambda m: None)
    assert torch.equal(a, b)  # the same fp32 encoding (and the same cache key)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [p.name for p in (tmp_path / "b").iterdir()]
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16  # the family keeps its own VAE
    # A bf16 VAE would have given other latents: the check above can fail.
    with torch.no_grad():
        direct = bf16.encode(torch.zeros(1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
        full = fp32.encode(torch.zeros(1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert not torch.equal(direct, full)


def test_warmup_in_iterations_is_the_same_length_for_both_models():
    """warmup_unit: iterations: the generator (one update per `ttur` iterations) warms up over as many
    iterations as the critic; optimizer_steps: each over that many of its own updates."""
    ttur, warm = 5, 10
    gen_iter = lr_factor("constant", warm / ttur, 100, 0.1)     # what the trainer builds for iterations
    critic = lr_factor("constant", warm, 100, 0.1)
    # Generator update u happens at iteration (u + 1) * ttur: full LR from iteration `warm` on, for both.
    assert gen_iter(1) == pytest.approx(2 * ttur / warm) and gen_iter(2) == 1.0 and critic(warm - 1) == 1.0
    assert lr_factor("constant", warm, 100, 0.1)(2) < 1.0  # optimizer_steps: 10 generator updates = 50 iterations


@pytest.mark.parametrize("name", ["sdxl-1step", "sdxl-4step", "sdxl-4step-lora", "sd15-1step"])
def test_sd_presets_follow_the_official_head_and_warmup(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.gan_head == "official"
    # Official: 500 scheduler steps, stepped once per process per iteration on 64 GPUs = ~8 iterations.
    assert (cfg.warmup_unit, cfg.warmup_steps) == ("iterations", 8)
    header = (ROOT / "configs" / f"{name}.yaml").read_text().split("\nfamily:")[0]
    assert "warm-up" in header and "iterations" in header


def test_config_rejects_unknown_head_and_warmup_unit():
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="gan_head"):
        DistillConfig(gan_head="big").validate()
    with pytest.raises(ConfigError, match="warmup_unit"):
        DistillConfig(warmup_unit="epochs").validate()
