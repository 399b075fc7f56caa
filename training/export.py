"""Export one checkpoint of a run as a student folder (the EMA if the run keeps one).

Training quality oscillates, so the best student is not always the last one:
`python -m training export --run runs/NAME --step 1000 --out students/NAME-1000`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dmd2.cli import invocation
from training.config import load_config
from training.distill import DMD2Trainer, write_student_card
from training.runs import Run, RunError


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | None = None,
                      command: str | None = None) -> Path:
    """Write the student of `run_dir`'s checkpoint at `step` (default: the latest) to the new folder `out`."""
    run, out = Run(run_dir), Path(out)
    if not run.config_path.is_file():
        raise RunError(f"{run.path} is not a run folder (no config.yaml)")
    dirs = run.checkpoint_dirs()
    if not dirs:
        raise RunError(f"{run.checkpoints} holds no checkpoint")
    steps = {int(d.name.split("-")[-1]): d for d in dirs}
    if step is None:
        step = max(steps)
    if step not in steps:
        raise RunError(f"{run.path} has no checkpoint of step {step}; it has steps {sorted(steps)}")
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} already exists and is not empty; choose a new --out (nothing was overwritten)")
    state = run.load_checkpoint(steps[step])
    # The checkpoint replaces the generator's weights, so its starting point need not exist any more.
    cfg = dataclasses.replace(load_config(run.config_path), generator_init=None)
    trainer = DMD2Trainer(cfg)
    trainer.load_state_dict(state)
    trainer.family.save_student(trainer.full_student(), out, timesteps=trainer.timesteps,
                                family=trainer.family.name, teacher=cfg.teacher)
    seconds = max([r["seconds"] for r in run.metrics() if r.get("step", 0) <= step and "seconds" in r], default=0.0)
    write_student_card(run, cfg, trainer, seconds, command or invocation(), folder=out,
                       note=f"checkpoint of step {step} of the run `{run.path}`")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training export",
                                description="Export a run's checkpoint as a student folder.")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/mnist-4step")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="new student folder")
    a = p.parse_args(argv)
    out = export_checkpoint(a.run, a.out, a.step)
    print(f"student written to {out}")
