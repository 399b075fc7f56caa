"""Random LoRAs for a tiny UNet, in every key layout `dmd2.families.lora.fuse_lora` reads, with the
factors kept apart so a test can compute the fused weights on its own (W + scale * alpha / rank * up @ down)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

# The LoRA targets of DMD2's main/sdxl/extract_lora_module.py (a PEFT LoraConfig: suffix match on module names).
DMD2_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
FORMATS = ("kohya", "kohya-bin", "diffusers", "peft", "peft-base-model")


def fake_dmd2_lora(unet, rank=2, alpha=1.0, seed=0):
    """A LoRA with the key layout of dmd2_sdxl_4step_lora_fp16.safetensors: PEFT names
    '<module>.lora_A.weight' turned into kohya names the way extract_lora_module.py does, plus '.alpha'."""
    g = torch.Generator().manual_seed(seed)
    peft, kohya = {}, {}
    for name, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(name == t or name.endswith("." + t) for t in DMD2_LORA_TARGETS):
            continue
        if isinstance(m, torch.nn.Linear):
            a, b = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:  # PEFT: lora_A is a conv with the layer's kernel, lora_B a 1x1 conv
            a = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            b = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        peft[f"{name}.lora_A.weight"], peft[f"{name}.lora_B.weight"] = a.half(), b.half()
    for k, v in peft.items():
        k = k.replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        k = "lora_unet_" + "_".join(k.split(".")[:-2]) + "." + ".".join(k.split(".")[-2:])
        kohya[k] = v
        kohya[k[: k.find(".")] + ".alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return peft, kohya


def layers_of(peft: dict) -> list[str]:
    """The module names a PEFT-layout LoRA targets."""
    return [k[: -len(".lora_A.weight")] for k in peft if k.endswith(".lora_A.weight")]


def write_lora(unet, folder, fmt: str, rank=2, seed=0) -> tuple[object, dict, dict]:
    """A LoRA for `unet` written in layout `fmt` (see FORMATS): (file or state dict, PEFT factors, alpha per layer).

    kohya: alphas differ between layers (1, 2, 3, ...), as a kohya file may have them; diffusers:
    one alpha in the safetensors metadata (our students); peft: no alpha (factor 1, alpha = rank);
    peft-base-model: PeftModel.save_pretrained's `base_model.model.` keys with a `.alpha` per layer.
    """
    peft, kohya = fake_dmd2_lora(unet, rank=rank, seed=seed)
    names = layers_of(peft)
    if fmt.startswith("kohya"):
        alphas = {n: float(1 + i % 3) for i, n in enumerate(names)}
        for n, a in alphas.items():
            kohya["lora_unet_" + n.replace(".", "_") + ".alpha"] = torch.tensor(a, dtype=torch.float16)
        if fmt == "kohya-bin":
            torch.save(kohya, folder / "lora.bin")
            return folder / "lora.bin", peft, alphas
        save_file(kohya, str(folder / "lora.safetensors"))
        return folder / "lora.safetensors", peft, alphas
    if fmt == "diffusers":
        config = {"r": rank, "lora_alpha": 3.0, "target_modules": DMD2_LORA_TARGETS}
        StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=peft, unet_lora_adapter_metadata=config,
                                                    weight_name="pytorch_lora_weights.safetensors")
        return folder / "pytorch_lora_weights.safetensors", peft, dict.fromkeys(names, 3.0)
    if fmt == "peft":
        return dict(peft), peft, dict.fromkeys(names, float(rank))
    if fmt == "peft-base-model":
        alphas = {n: 0.5 + i % 2 for i, n in enumerate(names)}
        sd = {f"base_model.model.{k}": v for k, v in peft.items()}
        sd.update({f"base_model.model.{n}.alpha": torch.tensor(a) for n, a in alphas.items()})
        save_file(sd, str(folder / "adapter_model.safetensors"))
        return folder / "adapter_model.safetensors", peft, alphas
    raise ValueError(fmt)
