"""LoRA students of the SD families: DMD2's LoRA targets, the file our LoRA students live in, and
fusing a LoRA into a UNet with diffusers' own loader (`lora_state_dict`, `load_lora_into_unet`,
`fuse_lora`), which does the key conversion, the alpha / rank scaling and the merge.

Layouts read (all as diffusers reads them):
- kohya: `lora_unet_<dotted name with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`. DMD2's
  `dmd2_sdxl_4step_lora_fp16.safetensors` is this (written by the official
  `main/sdxl/extract_lora_module.py` from a PEFT adapter; rank 64, alpha 8);
- diffusers: `unet.<name>.lora_A.weight` / `.lora_B.weight`, with rank and alpha in the safetensors
  metadata (our students: `save_unet_lora`, i.e. the pipeline's `save_lora_weights`);
- PEFT's own: `<name>.lora_A.weight` / `.lora_B.weight`, bare or under `base_model.model.`, with an
  optional `<name>.alpha` (without one, alpha = rank: factor 1, as diffusers and PEFT assume).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dmd2.families.base import ModelLoadError
from dmd2.families.sd_loading import first_line

# DMD2's LoRA targets for the SD UNet (module-name suffixes, as PEFT matches them): attention
# projections, transformer in/out and feed-forward, resnet convs and time projections, resamplers.
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                       "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights(folder) looks for
_ADAPTER = "dmd2_fused"  # the adapter's name while it is loaded, merged and unloaded again


def student_lora_file(folder) -> Path:
    """The LoRA file of a student folder without config.json: the one dmd2.json names as "lora" (our
    exports do), else the folder's only .safetensors file. Used by `load_student` and the registry alike."""
    folder = Path(folder)
    meta = {}
    if (folder / "dmd2.json").is_file():
        try:
            meta = json.loads((folder / "dmd2.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"cannot read {folder / 'dmd2.json'}: {type(e).__name__}: {e}") from None
    if isinstance(meta, dict) and meta.get("lora"):
        return folder / str(meta["lora"])
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ModelLoadError(f"{folder} has no config.json (not a diffusers UNet folder) and {len(files)} "
                             f".safetensors files: expected one LoRA file (or name it in dmd2.json as \"lora\")")
    return files[0]


def read_unet_lora(lora, pipeline_class: str = "StableDiffusionXLPipeline") -> tuple[dict, dict | None, dict | None]:
    """A UNet LoRA (file path or state dict) as diffusers loads it: (PEFT keys under `unet.`, alphas, adapter metadata)."""
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    source = dict(lora) if isinstance(lora, dict) else str(lora)
    try:
        state_dict, alphas, metadata = getattr(diffusers, pipeline_class).lora_state_dict(
            source, return_lora_metadata=True)
    except Exception as e:  # kohya keys without their pair, unknown kohya keys, an unreadable file
        raise ModelLoadError(f"could not read the LoRA {lora if isinstance(lora, (str, Path)) else '(state dict)'}: "
                             f"{first_line(e)}") from None
    # Ours, not diffusers': its SD loaders take only `unet.` keys (and kohya's, converted above) and
    # skip with a warning PEFT's own layouts, bare or under `base_model.model.` (PeftModel.save_pretrained).
    state_dict = {k if k.startswith(("unet.", "text_encoder")) else "unet." + k.removeprefix("base_model.model."): v
                  for k, v in state_dict.items()}
    others = [k for k in state_dict if not k.startswith("unet.")]
    if others:
        raise ModelLoadError(f"not a UNet LoRA key: {others[0]!r} (a text-encoder LoRA? only UNet LoRAs are fused)")
    # Ours too: diffusers reads alphas from kohya keys and metadata only, so PEFT-layout `.alpha`
    # keys become network alphas here.
    peft_alphas = {k: float(state_dict.pop(k)) for k in [k for k in state_dict if k.endswith(".alpha")]}
    if peft_alphas:
        alphas = {**(alphas or {}), **peft_alphas}
    # diffusers' own key mapping, for the weights (old diffusers / converted kohya keys -> lora_A / lora_B)
    # and for the kohya alphas: their names keep `processor.to_q_lora.down...`, which diffusers' per-layer
    # alpha pattern would not match, so a LoRA with mixed alphas would get the common one everywhere.
    state_dict = convert_unet_state_dict_to_peft(state_dict)
    if alphas:
        alphas = convert_unet_state_dict_to_peft(alphas)
    return state_dict, alphas, metadata


def _check_layers(unet: nn.Module, state_dict: dict) -> int:
    """Every LoRA layer names a Linear / Conv2d of this UNet and has both matrices; returns the layer count.

    Ours, not diffusers': it only warns about keys that match no layer, and leaves a layer whose
    lora_B is missing at PEFT's initialisation; both would load a different model without an error.
    """
    modules = {name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    layers: dict[str, set[str]] = {}
    for key in state_dict:
        layer, _, part = key.removeprefix("unet.").partition(".lora_")
        layers.setdefault(layer, set()).add(part)
    for layer, parts in layers.items():
        if layer not in modules:
            raise ModelLoadError(f"LoRA layer {layer!r} matches no Linear/Conv2d of this UNet "
                                 f"(is the LoRA for another model?)")
        for part in ("A.weight", "B.weight"):
            if part not in parts:
                raise ModelLoadError(f"LoRA layer {layer!r} lacks its lora_{part}")
    return len(layers)


@torch.no_grad()
def fuse_lora(unet: nn.Module, lora, scale: float = 1.0, pipeline_class: str = "StableDiffusionXLPipeline") -> int:
    """Fuse a LoRA (file path or state dict) into the UNet's weights in place, W += scale * (alpha / rank) * up @ down.

    Returns the number of layers changed. `scale` is diffusers' `fuse_lora(lora_scale=...)`. Every LoRA
    layer must name a Linear or Conv2d of this UNet with matching shapes, or nothing is changed. The
    UNet comes back plain (no adapter left on it).
    """
    import diffusers

    if getattr(unet, "peft_config", None):
        raise ValueError("this UNet carries a LoRA adapter already: fuse into a plain UNet")
    state_dict, alphas, metadata = read_unet_lora(lora, pipeline_class)
    count = _check_layers(unet, state_dict)
    try:
        getattr(diffusers, pipeline_class).load_lora_into_unet(state_dict, alphas, unet, adapter_name=_ADAPTER,
                                                               metadata=metadata)
    except Exception as e:  # a shape mismatch, mostly; diffusers drops the adapter's weights, unload_lora its layers
        unet.unload_lora()
        raise ModelLoadError(f"the LoRA does not fit this UNet: {first_line(e)}") from None
    unet.fuse_lora(lora_scale=scale, adapter_names=[_ADAPTER])
    unet.unload_lora()
    return count


def save_unet_lora(unet: nn.Module, folder, pipeline_class: str = "StableDiffusionXLPipeline") -> Path:
    """The UNet's one LoRA adapter as diffusers writes it (PEFT keys under `unet.`, rank and alpha
    in the safetensors metadata), so `load_lora_weights` restores the same scaling."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    (name, config), = unet.peft_config.items()
    layers = {k: v.detach().float().cpu().contiguous()
              for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}
    getattr(diffusers, pipeline_class).save_lora_weights(
        folder, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict(), weight_name=LORA_WEIGHT_NAME,
        safe_serialization=True)
    return Path(folder) / LORA_WEIGHT_NAME
