"""Run by tests/test_fsdp.py under torchrun with ACCELERATE_USE_FSDP=true: a tiny SDXL distillation on 2 CPU
processes, the generator and the critic sharded by FSDP2 (gloo).

    torchrun --nproc_per_node 2 tests/fsdp_worker.py CONFIG OUT [--resume]

Each rank then saves what it holds (its local shards, the full tensors it can all-gather, its last stats),
so the test can check that sharding happened and that the ranks agree.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor

from training.config import load_config
from training.distill import distill

if __name__ == "__main__":
    torch.set_num_threads(1)
    config, out = sys.argv[1], Path(sys.argv[2])
    acc = Accelerator(cpu=True)
    run = distill(load_config(config), out, resume="--resume" in sys.argv[3:], accelerator=acc)
    tr = run.trainer
    held = {}
    for key, module in (("generator", tr.generator), ("critic", tr.critic)):
        params = dict(module.named_parameters())
        held[key] = {
            "dtensor": {n: isinstance(p, DTensor) for n, p in params.items()},
            "local": {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()},
            "full": {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()},
        }
    torch.save({
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "sharded": tr.sharded,
        "units": tr.shard_units if tr.sharded else None,
        "step": tr.step,
        "rng": tr.rng.get_state(),
        **held,
    }, out / f"rank{acc.process_index}.pt")
