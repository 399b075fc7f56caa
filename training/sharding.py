"""FSDP2 for the trained models: `fully_shard` per UNet or transformer block, applied by the trainer itself, and the full
(unsharded) or sharded (DCP) state dicts of sharded models and their optimisers, for checkpoints and export.

Why the trainer shards and not `accelerate.prepare`: accelerate refuses FSDP without a GPU (with
`cpu=True` it silently runs DDP), so its FSDP path could never be tested here. The trainer applies
`torch.distributed.fsdp.fully_shard` itself whenever FSDP is asked for (`accelerate launch --config_file
configs/accelerate/fsdp.yaml`, which sets ACCELERATE_USE_FSDP=true, or that variable under torchrun): the
same code on CPU (gloo) and GPU (NCCL), with the shard units named in that config.

Each state function is a collective under FSDP: every rank calls it. Gathered states live on the CPU of
rank 0 only (the other ranks get empty dicts); loading takes the full dicts on every rank.
"""

from __future__ import annotations

import os
import warnings

import torch

# The shard units: each block is all-gathered only while it runs (configs/accelerate/fsdp.yaml names the
# same classes in fsdp_transformer_layer_cls_to_wrap; tests/test_fsdp.py checks that they agree). The UNets'
# blocks (SDXL, SD1.5, the pixel UNets), SD3's joint blocks and FLUX's double- and single-stream blocks; a model
# holds the classes of its own family only, so one list serves every family.
UNIT_CLASSES = ("DownBlock2D", "CrossAttnDownBlock2D", "UNetMidBlock2DCrossAttn", "CrossAttnUpBlock2D", "UpBlock2D",
                "JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def fsdp_requested(accelerator) -> bool:
    """True when the run was launched for FSDP (accelerate's state, or ACCELERATE_USE_FSDP=true) on >1 process."""
    from accelerate.utils import DistributedType

    asked = (accelerator.distributed_type == DistributedType.FSDP
             or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"))
    return asked and accelerator.num_processes > 1


def unit_classes() -> tuple[str, ...]:
    """The block classes to shard apart: FSDP_TRANSFORMER_CLS_TO_WRAP (set by accelerate launch) or UNIT_CLASSES."""
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return tuple(n.strip() for n in names.split(",") if n.strip()) or UNIT_CLASSES


def shard(module: torch.nn.Module, device: torch.device, classes: tuple[str, ...] | None = None) -> list[str]:
    """`fully_shard` every submodule of one of `classes`, then `module` itself (the rest); returns the unit names.

    Parameters become DTensors sharded over all ranks (dim 0); a unit is all-gathered for its forward and
    backward and resharded after. The parameters are fp32; bf16 compute comes from the trainer's autocast.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    classes = classes or unit_classes()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = [name for name, m in module.named_modules() if name and type(m).__name__ in classes]
    if not units:
        warnings.warn(f"FSDP: no {type(module).__name__} submodule is one of the shard unit classes {classes}; the "
                      "whole model is one unit, all-gathered at once (add its block classes to "
                      "fsdp_transformer_layer_cls_to_wrap)", stacklevel=2)
    for name in reversed(units):   # inner units before the modules that hold them, as fully_shard expects
        fully_shard(module.get_submodule(name), mesh=mesh, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, reshard_after_forward=True)
    return units


def clip_grad_norm_(parameters, max_norm: float) -> float:
    """torch's clip_grad_norm_ on (sharded) parameters: the norm of the full gradient, the same on every rank."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: torch.nn.Module) -> dict:
    """The model's full state dict, gathered on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimiser state keyed by parameter names), gathered on rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Shard full states (as `full_state` wrote them) back into the model and optimiser of this rank."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options())
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_options())



# --- sharded (DCP) checkpoints: each rank writes and reads only the shards it holds ----------------------
def local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimiser state keyed by parameter names) as this rank holds them: DTensor shards under
    FSDP, plain tensors otherwise; nothing is gathered. Initialises an optimiser that has not stepped yet."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return get_model_state_dict(model), get_optimizer_state_dict(model, optimizer)


def load_local_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optimizer_state: dict) -> None:
    """Put states of `local_state`'s layout (as `read_shards` filled them) into the model and optimiser."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, optimizer, optimizer_state)


def write_shards(state: dict, folder) -> None:
    """torch.distributed.checkpoint: every rank writes its own shards of `state` into `folder` (rank 0 adds the
    metadata); a collective under several processes."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(folder))


def read_shards(template: dict, folder) -> None:
    """Fill `template` (a `local_state`-shaped dict of this rank's tensors) in place from a DCP `folder`; it may
    have been written by another number of processes (DCP reshards)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, checkpoint_id=str(folder))
