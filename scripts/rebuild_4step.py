"""Rebuild the embedded 4-step student (assets/mnist/dmd2-4step) from the repository, end to end.

Four distillation stages chained by generator_init, stages 2-4 each exported as a checkpoint mean
(`make rebuild-4step`; about 100 minutes on one CPU thread):

    OUT/stage1         configs/mnist-4step-stage1.yaml, from assets/mnist/dmd2-1step        (2,600 iterations)
    OUT/stage2         configs/mnist-4step-stage2.yaml, from OUT/stage1/student       (1,500)
    OUT/stage2-export  mean of stage 2's start and its kept checkpoints               (steps 0 250 ... 1500)
    OUT/stage3         configs/mnist-4step-stage3.yaml, from OUT/stage2-export        (1,500, stopped after 500)
    OUT/stage3-export  mean of stage 3's start and its checkpoints up to 500          (steps 0 125 ... 500)
    OUT/stage4         configs/mnist-4step-stage4.yaml, from OUT/stage3-export        (1,500, stopped after 500)
    OUT/stage4-export  the same rule: the 4-step student

Each command is printed before it runs. Re-running skips every step whose output exists and resumes an
unfinished run from its last checkpoint. `--set k=v` (repeatable) changes every stage (tests use a tiny
budget); then the export steps follow the shortened runs instead of being checked against the card's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.runs import Run  # noqa: E402

# (run, preset, start, threads, stop after, the card's export steps or None for stage 1)
STAGES = [
    ("stage1", "configs/mnist-4step-stage1.yaml", "assets/mnist/dmd2-1step", 1, None, None),
    ("stage2", "configs/mnist-4step-stage2.yaml", "{out}/stage1/student", 1, None, "0 250 500 750 1000 1250 1500"),
    ("stage3", "configs/mnist-4step-stage3.yaml", "{out}/stage2-export", 1, 500, "0 125 250 375 500"),
    ("stage4", "configs/mnist-4step-stage4.yaml", "{out}/stage3-export", 2, 500, "0 125 250 375 500"),
]


def run_command(cmd: list[str], threads: int) -> None:
    """Print `cmd` as a shell line, then run it from the repository root with OMP_NUM_THREADS=threads."""
    threads = int(os.environ.get("OMP_NUM_THREADS") or threads)
    print(f"+ OMP_NUM_THREADS={threads} {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=str(threads))).returncode
    if code != 0:
        sys.exit(f"error: that command exited with code {code}; fix what it says and run this script again "
                 f"(finished steps are skipped)")


def reached(run: Run, stop: int | None) -> bool:
    """Whether the run is done: finished, or (when it stops early) holds a checkpoint at or past `stop`."""
    if run.is_finished():
        return True
    return stop is not None and any(n >= stop for n in run.checkpoint_steps())


def export_steps(run: Run, stop: int | None) -> str:
    """0 (the run's start) and every kept checkpoint up to `stop` (all if None)."""
    steps = list(run.checkpoint_steps())
    return " ".join(str(n) for n in [0] + [n for n in steps if stop is None or n <= stop])


def rebuild(out: Path, overrides: list[str], stop_after: int | None, python: str = sys.executable) -> Path:
    """Run the missing stages and exports into `out`; returns the final student folder."""
    out.mkdir(parents=True, exist_ok=True)
    sets = [a for kv in overrides for a in ("--set", kv)]
    for name, preset, start, threads, stop, card_steps in STAGES:
        stop = stop_after if stop is not None and stop_after is not None else stop
        run, export = Run(out / name), out / f"{name}-export"
        if export.is_dir() or (card_steps is None and (out / "stage2-export").is_dir()):
            print(f"skip: {export if card_steps else run.student} exists")
            continue
        if reached(run, stop):
            print(f"skip: {run.path} is done")
        else:
            if run.config_path.is_file():           # an interrupted run: continue it with its own config
                args = ["--out", str(run.path), "--resume"]
            else:
                args = ["--config", preset, "--out", str(run.path), "--set", f"generator_init={start.format(out=out)}",
                        *sets]
            run_command([python, "-m", "training", "distill", *args]
                        + (["--stop-after", str(stop)] if stop is not None else []), threads)
            if not reached(run, stop):
                sys.exit(f"error: {run.path} did not reach its end (step {stop}: a multiple of checkpoint_every?)")
        if card_steps is None:
            continue
        steps = export_steps(run, stop)
        if not overrides and stop_after is None and steps != card_steps:
            sys.exit(f"error: {run.path} has checkpoints for steps {steps!r}; the recipe exports {card_steps!r}")
        run_command([python, "-m", "training", "export", "--run", str(run.path), "--step", *steps.split(),
                     "--out", str(export)], threads)
    final = out / "stage4-export"
    print(f"the 4-step student: {final} (to serve it, copy its config.json, diffusion_pytorch_model.safetensors, "
          f"dmd2.json and scheduler_config.json to assets/mnist/dmd2-4step/)")
    return final


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rebuild-4step", help="folder for the runs and exports")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every stage (repeatable)")
    p.add_argument("--stop-after", type=int, help="where stages 3 and 4 stop (default: 500, as recorded)")
    a = p.parse_args(argv)
    rebuild(Path(a.out).resolve(), a.overrides, a.stop_after)


if __name__ == "__main__":
    main()
