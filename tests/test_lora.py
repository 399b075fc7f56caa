"""dmd2.families.lora: diffusers' LoRA loader and PEFT's merge, checked against the fused weights
computed here by hand (W + scale * alpha / rank * up @ down) for every key layout we read."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dmd2.families.base import ModelLoadError
from dmd2.families.lora import fuse_lora, read_unet_lora

import tiny_sd
from lora_files import FORMATS, fake_dmd2_lora, layers_of, write_lora


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_sd.tiny_unet(sdxl=True).eval().requires_grad_(False)


def by_hand(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, factor: float) -> torch.Tensor:
    """W + factor * up @ down, for a Conv2d the kernel sum_r up[o, r] * down[r, i, :, :] (up is 1x1)."""
    down, up = down.float(), up.float()
    update = up @ down if down.ndim == 2 else torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return weight + factor * update


@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_weights_agree_with_the_hand_computation(unet, tmp_path, fmt, scale):
    lora, peft, alphas = write_lora(unet, tmp_path, fmt, rank=2)
    fused = copy.deepcopy(unet)
    names = layers_of(peft)
    assert fuse_lora(fused, lora, scale=scale) == len(names)
    assert not getattr(fused, "peft_config", None)  # the adapter is gone, only its update stays
    assert all(type(m) in (nn.Linear, nn.Conv2d) for n, m in fused.named_modules() if n in names)
    base, out = dict(unet.named_modules()), dict(fused.named_modules())
    worst = 0.0
    for name in names:
        expected = by_hand(base[name].weight, peft[f"{name}.lora_A.weight"], peft[f"{name}.lora_B.weight"],
                           scale * alphas[name] / 2)
        worst = max(worst, (out[name].weight - expected).abs().max().item())
    print(f"{fmt}, scale {scale}: {len(names)} layers, max |library - by hand| = {worst:.3g}")
    assert worst < 1e-5
    for name, p in unet.named_parameters():  # everything else (biases, norms, untargeted layers) is untouched
        if name.rsplit(".", 1)[0] not in names or name.endswith("bias"):
            assert torch.equal(p, fused.get_parameter(name)), name


def test_kohya_alphas_are_read_per_layer(unet, tmp_path):
    """diffusers names kohya alphas after its old attention keys (`processor.to_q_lora...`); read_unet_lora
    maps them like the weights, or a LoRA with mixed alphas would fuse its attention layers with the common one."""
    lora, peft, alphas = write_lora(unet, tmp_path, "kohya")
    assert len(set(alphas.values())) > 1
    _, read, _ = read_unet_lora(lora)
    layer = {k: k.removeprefix("unet.").split(".lora_A.")[0].removesuffix(".alpha") for k in read}  # as diffusers
    assert {layer[k]: v for k, v in read.items()} == alphas                                           # reads them


def test_a_foreign_lora_changes_nothing(unet):
    peft, kohya = fake_dmd2_lora(unet)
    target = copy.deepcopy(unet)
    bad = dict(kohya, **{"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
                         "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(ModelLoadError, match="'no.such.layer' matches no Linear/Conv2d"):  # as diffusers renames it
        fuse_lora(target, bad)
    wrong = dict(peft, **{"conv_in.lora_A.weight": torch.zeros(2, 3, 3, 3), "conv_in.lora_B.weight": torch.zeros(4, 2, 1, 1)})
    with pytest.raises(ModelLoadError, match="does not fit"):  # conv_in takes 4 channels, not 3
        fuse_lora(target, wrong)
    assert not getattr(target, "peft_config", None)
    for (name, p), q in zip(unet.named_parameters(), target.parameters()):  # all or nothing
        assert torch.equal(p, q), name
    assert all(type(a) is type(b) for a, b in zip(unet.modules(), target.modules()))  # no LoRA layer left behind


def test_incomplete_or_non_unet_loras_fail_clearly(unet):
    with pytest.raises(ModelLoadError, match="lora_up"):
        fuse_lora(copy.deepcopy(unet), {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(ModelLoadError, match="lacks its lora_B"):
        fuse_lora(copy.deepcopy(unet), {"conv_in.lora_A.weight": torch.zeros(2, 4, 3, 3)})
    with pytest.raises(ModelLoadError, match="text-encoder"):
        fuse_lora(copy.deepcopy(unet), {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                                        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)})
