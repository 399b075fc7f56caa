"""A LoRA generator through PEFT: the teacher copy is frozen, only the adapter's matrices train."""

from __future__ import annotations

import torch

from training.config import ConfigError


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, targets, base_dtype: torch.dtype = torch.float32) -> int:
    """Freeze `unet`, add a fp32 PEFT LoRA adapter (rank, alpha) on the layers named by `targets`
    (module-name suffixes), cast the frozen base to `base_dtype`; returns the number of LoRA parameters.

    The adapter starts as a no-op (PEFT's default init: B = 0), so the generator starts as the teacher.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("lora_rank > 0 needs the peft package (pip install peft)") from None
    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    except ValueError as e:  # PEFT: "Target modules ... not found in the base model"
        raise ConfigError(f"lora_target_modules {list(targets)}: {e}") from None
    count = 0
    for name, p in unet.named_parameters():
        is_lora = ".lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            p.data = p.data.float()
            count += p.numel()
        elif p.dtype != base_dtype:
            p.data = p.data.to(base_dtype)
    return count
