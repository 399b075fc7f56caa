"""Reading the parts of a Stable Diffusion folder (or Hub repo) and plain weight files for the SD
families, every failure a ModelLoadError that names what could not be read and why."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dmd2.families.base import ModelLoadError


def first_line(e: Exception) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first parameter (our modules hold one dtype)."""
    return next(module.parameters()).dtype


def move_to(module: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move to `device`; cast only when the dtype differs (diffusers warns on every cast)."""
    module = module.to(device)
    if dtype is not None and param_dtype(module) != dtype:
        module = module.to(dtype=dtype)
    return module


def load_part(cls_, source, subfolder=None, **kwargs):
    """`cls_.from_pretrained(source, subfolder=...)`, failing with a ModelLoadError that names the folder."""
    try:
        return cls_.from_pretrained(source, subfolder=subfolder, **kwargs)
    except Exception as e:
        where = f"{source}" + (f"/{subfolder}" if subfolder else "")
        raise ModelLoadError(f"could not load {cls_.__name__} from {where}: {first_line(e)}") from None


def load_vaes(source, device, dtype, vae=None, vae_subfolder=None, tiny_vae=None, **kwargs):
    """The decoding VAE(s): the teacher's, or another AutoencoderKL (e.g. madebyollin/sdxl-vae-fp16-fix),
    plus an optional AutoencoderTiny (madebyollin/taesdxl or taesd) for fast previews."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if isinstance(vae, nn.Module):
        kl = vae
    else:
        where, sub = (vae, vae_subfolder) if vae is not None else (source, "vae")
        try:
            force_upcast = AutoencoderKL.load_config(where, subfolder=sub, **kwargs).get("force_upcast", True)
        except Exception:
            force_upcast = True  # the load below reports the problem
        # SDXL's original VAE overflows in fp16 (its config says force_upcast): keep it in fp32 then.
        kl_dtype = torch.float32 if (dtype == torch.float16 and force_upcast) else dtype
        kl = load_part(AutoencoderKL, where, subfolder=sub, dtype=kl_dtype, **kwargs)
    kl = move_to(kl.eval().requires_grad_(False), device)
    tiny = None
    if tiny_vae is not None:
        tiny = tiny_vae if isinstance(tiny_vae, nn.Module) else load_part(AutoencoderTiny, tiny_vae, dtype=dtype,
                                                                          **kwargs)
        tiny = move_to(tiny.eval().requires_grad_(False), device, dtype)
    return kl, tiny


def load_configs(source, unet_subfolder: str = "unet", **kwargs) -> tuple[dict, dict]:
    """The UNet's config (required) and the scheduler's (empty when absent) of an SD folder or Hub repo."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    try:
        unet_config = dict(UNet2DConditionModel.load_config(source, subfolder=unet_subfolder, **kwargs))
    except Exception as e:
        raise ModelLoadError(f"{source} has no readable {unet_subfolder}/config.json: {first_line(e)}") from None
    local = Path(source) / "scheduler" / "scheduler_config.json"
    if Path(source).is_dir() and not local.is_file():
        return unet_config, {}   # no scheduler folder: the SD defaults
    try:  # any scheduler class reads scheduler_config.json as a plain dict (SchedulerMixin has no load_config)
        sched = dict(DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs))
    except Exception as e:
        if not Path(source).is_dir() and isinstance(e, OSError) and "valid JSON" not in str(e):
            return unet_config, {}   # a Hub repo without a scheduler
        raise ModelLoadError(f"{source} has an unreadable scheduler/scheduler_config.json: {first_line(e)}") from None
    return unet_config, sched


def fill_from_state_dict(net: torch.nn.Module, state_dict: dict, dtype: torch.dtype, what: str,
                         network: str) -> torch.nn.Module:
    """Load exactly `state_dict` (in `dtype`) into `net`, an empty network of the teacher's config (e.g. on the
    meta device: `assign=True`); ModelLoadError naming `what` and the `network` it does not fit when a key is
    missing or extra or a shape differs."""
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ModelLoadError(f"{what} does not fit {network}: {len(missing)} missing keys {missing[:3]}, "
                             f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    try:
        net.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{what} does not fit {network}: {str(e).strip().splitlines()[-1]}") from None
    return net


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .bin/.pt file read with torch.load(weights_only=True) (no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"weight file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"could not read {path} as plain tensors: {first_line(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(f"{path} does not hold a flat state dict of tensors")
    return sd
