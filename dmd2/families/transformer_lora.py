"""LoRA students of the transformer families (SD3's MMDiT, FLUX; any diffusers transformer with PeftAdapterMixin):
the file they live in and fusing one into a transformer, with diffusers' own loader
(`<Pipeline>.lora_state_dict`, `ModelMixin.load_lora_adapter`, `fuse_lora`), which derives the LoRA config
(rank, alpha from the file's metadata) and merges it. `dmd2.families.lora` does the same for UNets.

Layouts read:
- diffusers: `transformer.<name>.lora_A.weight` / `.lora_B.weight`, rank and alpha in the safetensors metadata
  (our students: `save_transformer_lora`, i.e. the pipeline's `save_lora_weights`);
- PEFT's own: `<name>.lora_A.weight` / `.lora_B.weight`, bare or under `base_model.model.`, with an optional
  `<name>.alpha` per layer (without one, alpha = rank: factor 1, as diffusers and PEFT assume).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from dmd2.families.base import ModelLoadError
from dmd2.families.lora import LORA_WEIGHT_NAME, _check_layers
from dmd2.families.sd_loading import first_line

PREFIX = "transformer"     # diffusers' key prefix of a pipeline's transformer LoRA
_ADAPTER = "dmd2_fused"    # the adapter's name while it is loaded, merged and unloaded again


def read_transformer_lora(lora, pipeline_class: str) -> tuple[dict, dict | None, dict | None]:
    """A transformer LoRA (file path or state dict) as diffusers loads it: (keys under `transformer.`, PEFT
    `.alpha` values as network alphas or None, adapter metadata or None)."""
    import diffusers

    source = dict(lora) if isinstance(lora, dict) else str(lora)
    loader = getattr(diffusers, pipeline_class).lora_state_dict
    # FLUX's loader moves `alpha` keys out of the state dict (returned only with return_alphas): they go back in,
    # to be read below as in every other layout.
    with_alphas = "return_alphas" in inspect.signature(loader).parameters
    try:
        if with_alphas:
            state_dict, loader_alphas, metadata = loader(source, return_alphas=True, return_lora_metadata=True)
            state_dict = {**state_dict, **(loader_alphas or {})}
        else:
            state_dict, metadata = loader(source, return_lora_metadata=True)
    except Exception as e:  # an unreadable or missing file
        raise ModelLoadError(f"could not read the LoRA {lora if isinstance(lora, (str, Path)) else '(state dict)'}: "
                             f"{first_line(e)}") from None
    if not state_dict:
        raise ModelLoadError(f"the LoRA {lora if isinstance(lora, (str, Path)) else '(state dict)'} holds no tensors")
    # PEFT's layouts (bare, or under `base_model.model.` as PeftModel.save_pretrained writes) get diffusers' prefix.
    state_dict = {k if k.startswith((PREFIX + ".", "text_encoder")) else f"{PREFIX}.{k.removeprefix('base_model.model.')}": v
                  for k, v in state_dict.items()}
    others = [k for k in state_dict if not k.startswith(PREFIX + ".")]
    if others:
        raise ModelLoadError(f"not a transformer LoRA key: {others[0]!r} (a text-encoder LoRA? only transformer "
                             f"LoRAs are fused)")
    alphas = {k: float(state_dict.pop(k)) for k in [k for k in state_dict if k.endswith(".alpha")]} or None
    if alphas and metadata:
        raise ModelLoadError("the LoRA has both per-layer .alpha tensors and adapter metadata; keep one")
    bad = [k for k in state_dict if ".lora_A." not in k and ".lora_B." not in k]
    if bad:
        raise ModelLoadError(f"not a LoRA weight: {bad[0]!r} (expected <layer>.lora_A.weight / .lora_B.weight)")
    return state_dict, alphas, metadata


@torch.no_grad()
def fuse_transformer_lora(transformer: nn.Module, lora, pipeline_class: str, scale: float = 1.0) -> int:
    """Fuse a LoRA (file path or state dict) into the transformer's weights in place,
    W += scale * (alpha / rank) * B @ A; returns the number of layers changed. Every LoRA layer must name a
    Linear of this transformer with matching shapes, or nothing is changed. The transformer comes back plain."""
    if getattr(transformer, "peft_config", None):
        raise ValueError("this transformer carries a LoRA adapter already: fuse into a plain one")
    state_dict, alphas, metadata = read_transformer_lora(lora, pipeline_class)
    count = _check_layers(transformer, {k.removeprefix(PREFIX + "."): v for k, v in state_dict.items()})
    try:
        transformer.load_lora_adapter(state_dict, prefix=PREFIX, adapter_name=_ADAPTER, metadata=metadata,
                                      network_alphas=alphas)
    except Exception as e:  # a shape mismatch, mostly
        transformer.unload_lora()
        raise ModelLoadError(f"the LoRA does not fit this transformer: {first_line(e)}") from None
    transformer.fuse_lora(lora_scale=scale, adapter_names=[_ADAPTER])
    transformer.unload_lora()
    return count


def save_transformer_lora(transformer: nn.Module, folder, pipeline_class: str) -> Path:
    """The transformer's one LoRA adapter as the pipeline's `save_lora_weights` writes it (keys under
    `transformer.`, rank and alpha in the safetensors metadata), so `load_lora_weights(folder)` restores it."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    (name, config), = transformer.peft_config.items()
    layers = {k: v.detach().float().cpu().contiguous()
              for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}
    getattr(diffusers, pipeline_class).save_lora_weights(
        folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config.to_dict(),
        weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return Path(folder) / LORA_WEIGHT_NAME


def save_transformer_student(transformer: nn.Module, path, pipeline_class: str, meta: dict) -> None:
    """A transformer student's folder: the diffusers model (config.json + safetensors, loads in plain diffusers),
    or for a transformer with a PEFT LoRA adapter only the LoRA (`pipeline_class.load_lora_weights(folder)` reads
    it, and `meta` gets its file name as "lora"); then dmd2.json with `meta`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if getattr(transformer, "peft_config", None):
        meta = {"lora": save_transformer_lora(transformer, path, pipeline_class).name, **meta}
    else:
        transformer.save_pretrained(path, safe_serialization=True)
    (path / "dmd2.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")
