"""A 2-process DDP run on CPU (gloo) keeps both ranks' weights identical, with different data per rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_UNET, free_port, make_two_class_folder
from dmd2.families.pixel import PixelFamily, load_pixel_unet
from training.config import DistillConfig

ROOT = Path(__file__).resolve().parent.parent


def tiny_run_config(tmp_path: Path, **overrides) -> Path:
    """A tiny random teacher, a two-class image folder and a run config over them, written to cfg.yaml."""
    fam = PixelFamily(num_classes=3, image_size=8)
    torch.manual_seed(0)
    fam.save_student(fam.new_unet(**TINY_UNET), tmp_path / "teacher")
    data = make_two_class_folder(tmp_path / "images")
    cfg = DistillConfig(teacher=str(tmp_path / "teacher"), data=str(data), batch_size=4, warmup_steps=1,
                        log_every=1, sample_every=0, eval_every=0, mixed_precision="no", **overrides).validate()
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    return cfg_file


# js: its weights are normalised over both ranks; sid: its gradient runs back through the DDP-wrapped fake score
@pytest.mark.parametrize("objective", [dict(dm_divergence="reverse-kl"), dict(dm_divergence="js"), dict(dm_loss="sid")],
                         ids=["reverse-kl", "js", "sid"])
def test_two_process_ddp_keeps_ranks_identical(tmp_path, objective):
    cfg_file = tiny_run_config(tmp_path, iterations=6, ttur=3, checkpoint_every=6, generator_lr=1e-3, critic_lr=1e-3,
                               **objective)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    r = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(free_port()), str(ROOT / "tests" / "ddp_worker.py"),
                        str(cfg_file), str(tmp_path / "run")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    rank0 = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "run" / "rank1.pt", weights_only=True)
    assert rank0["world_size"] == 2 and "MULTI_CPU" in rank0["distributed_type"]
    # Different data on each rank ...
    assert not torch.equal(rank0["first_epoch_order"], rank1["first_epoch_order"])
    # ... yet identical weights: gradients were averaged across ranks at every update.
    for key in ("generator", "ema", "critic"):
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name]), f"{key}.{name} differs across ranks"
    # The generator moved (the test would pass trivially otherwise), and the checkpoint holds rank 0's state.
    start = load_pixel_unet(tmp_path / "teacher").state_dict()
    assert any(not torch.equal(start[n], rank0["generator"][n]) for n in start)
    ckpt = torch.load(tmp_path / "run/checkpoints/step-00000006/state.pt", weights_only=True)
    assert all(torch.equal(ckpt["generator"][n], rank0["generator"][n]) for n in rank0["generator"])
