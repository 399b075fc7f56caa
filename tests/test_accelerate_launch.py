"""The documented multi-process command on CPU: `accelerate launch --multi_gpu --num_processes 2 -m training distill`.

`--multi_gpu` picks accelerate's torchrun launcher; without GPUs the Accelerator then runs DDP over gloo
on CPU. (`--cpu` would start a single process: accelerate's CPU launcher needs MPI for more.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import free_port
from test_ddp import tiny_run_config
from training.runs import Run

ROOT = Path(__file__).resolve().parent.parent


def test_accelerate_launch_two_cpu_processes_finishes_a_run(tmp_path):
    cfg_file = tiny_run_config(tmp_path, iterations=4, ttur=2, checkpoint_every=4)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "training", "distill", "--config", str(cfg_file), "--out", str(tmp_path / "run")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = Run(tmp_path / "run")
    assert run.status()["state"] == "finished" and run.status()["step"] == 4
    assert (run.path / "student" / "dmd2.json").is_file()
    assert "on 2 process(es)" in (run.path / "student" / "MODEL_CARD.md").read_text()  # really two ranks
    assert [m["step"] for m in run.metrics()] == [1, 2, 3, 4]
