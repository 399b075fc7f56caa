"""Full (unsharded) state dicts of FSDP-sharded models and their optimisers, for checkpoints and export.

Each function is a collective under FSDP: every rank calls it. Gathered states live on the CPU of
rank 0 only (the other ranks get empty dicts); loading takes the full dicts on every rank.
"""

from __future__ import annotations

import torch


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
