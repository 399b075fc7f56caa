"""Memory per GPU of each SD preset, computed from parameter counts of the real-size models.

    python benchmarks/memory.py [--gpus 1 2 4 8] [--json out.json]

The UNets are built from configs/real_unets/*.json, the text encoders and the VAE from their public
configs, all on the meta device (shapes only, nothing allocated). Per GPU, for each preset:

- params: the frozen teacher, text encoders and VAE in the preset's frozen_dtype; the generator (fp32, or a
  LoRA's bf16/fp32 base plus its fp32 adapters) and the fake score + GAN head (fp32);
- grads: fp32 gradients of the larger trained model (the trainer frees each model's gradients after its
  step, so the generator's and the critic's never coexist);
- optimizer: AdamW's two fp32 moments of everything trained;
- FSDP over N GPUs shards the trained parts (params, grads, moments) N ways and all-gathers one block at a
  time: the largest shard unit, fp32, twice (the running block and the prefetched next one).

Activations are NOT included (they depend on batch, resolution and gradient checkpointing; see
benchmarks/sdxl_gpu.py for measured peaks); nor are the CUDA context and allocator slack.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("sdxl-4step", "sdxl-1step", "sdxl-4step-lora", "sd15-1step")
GIB = 2 ** 30


@functools.lru_cache(maxsize=None)
def meta_unet(name: str):
    """`real_unet(name)` on the meta device, built once (callers must not change it)."""
    return real_unet(name)


def real_unet(name: str, device: str = "meta"):
    """A UNet of the real shapes (configs/real_unets/NAME.json) with random weights, on `device`."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(json.loads((ROOT / "configs/real_unets" / f"{name}.json").read_text()))


def _clip(hidden: int, layers: int, heads: int, projection: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection)
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


@functools.lru_cache(maxsize=None)
def frozen_extras(family: str) -> int:
    """Parameters of the text encoders and the VAE (CLIP ViT-L/14 text; + OpenCLIP bigG for SDXL)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    models = [vae, _clip(768, 12, 12, 768, False)]
    if family == "sdxl":
        models.append(_clip(1280, 32, 20, 1280, True))
    return sum(count(m) for m in models)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_params(unet, cfg) -> int:
    """Trainable parameters of the preset's LoRA (PEFT on the meta device)."""
    import copy

    from dmd2.families import family_class
    from training.lora import add_lora

    unet = copy.deepcopy(unet)
    targets = cfg.lora_target_modules or family_class(cfg.family).lora_target_modules
    add_lora(unet, cfg.lora_rank, cfg.lora_alpha, targets)
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def head_params(cfg, unet) -> int:
    from training.critic import GanHead, OfficialGanHead

    if not cfg.use_gan:
        return 0
    side = cfg.resolution // 8 // 2 ** (len(unet.config.block_out_channels) - 1)
    with torch.device("meta"):
        head = OfficialGanHead(1280, side) if cfg.gan_head == "official" else GanHead(1280)
    return count(head)


def largest_unit(unet) -> int:
    from training.sharding import UNIT_CLASSES

    return max(count(m) for m in unet.modules() if type(m).__name__ in UNIT_CLASSES)


def preset_memory(name: str, gpus: int) -> dict:
    """Bytes per GPU of preset `name` trained on `gpus` GPUs (FSDP when > 1 and not LoRA, else one GPU / DDP)."""
    from training.config import load_config

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    unet = meta_unet("sdxl-base" if cfg.family == "sdxl" else "sd15")
    p_unet, frozen_b = count(unet), 2 if cfg.frozen_dtype == "bf16" else 4
    p_extra, p_head = frozen_extras(cfg.family), head_params(cfg, unet)
    trained_gen = lora_params(unet, cfg) if cfg.lora_rank else p_unet
    trained_critic = p_unet + p_head
    shards = gpus if gpus > 1 and not cfg.lora_rank else 1
    frozen = (p_unet + p_extra) * frozen_b + (p_unet * frozen_b if cfg.lora_rank else 0)  # teacher (+ LoRA base)
    params = frozen + 4 * (trained_gen + trained_critic) / shards
    grads = 4 * max(trained_gen, trained_critic) / shards
    optim = 8 * (trained_gen + trained_critic) / shards
    gather = 2 * 4 * largest_unit(unet) if shards > 1 else 0
    ema = 4 * p_unet if cfg.ema_decay > 0 else 0
    return {"preset": name, "mode": ("LoRA" if cfg.lora_rank else "full") + (f", FSDP/{shards}" if shards > 1 else ""),
            "gpus": gpus, "unet_params": p_unet, "trained_generator_params": trained_gen,
            "params_bytes": params + ema, "grads_bytes": grads, "optimizer_bytes": optim, "fsdp_gather_bytes": gather,
            "total_bytes": params + ema + grads + optim + gather}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    rows = []
    for name in a.presets:
        for gpus in a.gpus:
            row = preset_memory(name, gpus)
            if rows and row["mode"] == rows[-1]["mode"] and row["preset"] == rows[-1]["preset"]:
                continue  # LoRA runs on each GPU whole (DDP): the same per GPU at any count
            rows.append(row)
    print("Memory per GPU from parameter counts (GiB; activations not included)\n")
    print("| preset | mode | UNet params | trained generator params | params | grads | AdamW | FSDP gather | total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gib = [r[k] / GIB for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "fsdp_gather_bytes", "total_bytes")]
        print(f"| {r['preset']} | {r['mode']} | {r['unet_params'] / 1e9:.3f}B | {r['trained_generator_params'] / 1e6:,.1f}M | "
              + " | ".join(f"{g:.1f}" for g in gib) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
