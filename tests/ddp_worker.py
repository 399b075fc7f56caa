"""Run by tests/test_ddp.py under torchrun: a tiny distillation on 2 CPU processes (DDP over gloo).

Each rank then saves what it holds, so the test can check that the ranks agree.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from training.config import load_config
from training.distill import distill

if __name__ == "__main__":
    torch.set_num_threads(1)
    config, out = sys.argv[1], Path(sys.argv[2])
    acc = Accelerator(cpu=True)
    run = distill(load_config(config), out, accelerator=acc)
    tr = run.trainer
    torch.save({
        "world_size": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "generator": tr.generator_module.state_dict(),
        "ema": tr.ema.state_dict(),
        "critic": tr.critic_module.state_dict(),
        "first_epoch_order": tr.sampler.state_dict()["perm"],
    }, out / f"rank{acc.process_index}.pt")
