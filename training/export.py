"""Export a run's checkpoint, or the mean of several, as a student folder (the EMA if the run keeps one).

Training quality oscillates, so the best student is not always the last one:
`python -m training export --run runs/NAME --step 1000 --out students/NAME-1000`.
Several steps export the mean of their weights (checkpoint averaging, as in model soups); step 0 is the
weights the run started from: `python -m training export --run runs/NAME --step 0 250 500 --out students/NAME-avg`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from dmd2.cli import invocation
from training.config import load_config
from training.distill import load_checkpoint_into, write_student_card
from training.trainer import DMD2Trainer
from training.runs import Run, RunError


def mean_state_dict(state_dicts: Iterable[dict[str, torch.Tensor]],
                    weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The mean of state dicts (weighted by non-negative `weights`, normalised to sum 1), summed in float64 and
    returned in the first one's dtypes; entries that are not floating point are taken from the first.
    `state_dicts` may be a generator: each is read once, before the next is made, so one model can be reloaded
    in place."""
    if weights is not None and not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weights must be finite and non-negative, got {list(weights)}")
    total, first, count = None, None, 0
    for i, sd in enumerate(state_dicts):
        if weights is not None and i >= len(weights):
            raise ValueError(f"{len(weights)} weights for more state dicts")
        w = 1.0 if weights is None else float(weights[i])
        if total is None:
            first = {k: v.clone() for k, v in sd.items() if not v.is_floating_point()}
            first.update({k: v.dtype for k, v in sd.items() if v.is_floating_point()})
            shapes = {k: v.shape for k, v in sd.items()}
            total = {k: v.to(torch.float64, copy=True) * w for k, v in sd.items() if v.is_floating_point()}
        elif {k: v.shape for k, v in sd.items()} != shapes:
            raise ValueError(f"state dict {i + 1} has different entries or shapes from the first")
        else:
            for k in total:
                total[k].add_(sd[k].to(torch.float64), alpha=w)
        count += 1
    if total is None:
        raise ValueError("no state dict to average")
    if weights is not None and len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} state dicts")
    norm = float(sum(weights)) if weights is not None else float(count)
    if norm <= 0:
        raise ValueError(f"the weights sum to {norm}; they must sum to a positive number")
    return {k: (total[k] / norm).to(first[k]) if k in total else first[k] for k in first}


def export_checkpoint(run_dir: str | Path, out: str | Path, step: int | list[int] | None = None,
                      command: str | None = None) -> Path:
    """Write the student of `run_dir`'s checkpoint at `step` (default: the latest) to the new folder `out`.

    The EMA if the run keeps one, else the raw generator. Step 0 is the weights the run started from (its
    generator_init, or the teacher). A list of steps writes the mean of their weights. It builds the run's
    trainer, so the teacher and the training data (or latent cache) must be where the run's config says.
    """
    run, out = Run(run_dir), Path(out)
    if not run.config_path.is_file():
        raise RunError(f"{run.path} is not a run folder (no config.yaml)")
    available = run.checkpoint_steps()
    if not available:
        raise RunError(f"{run.checkpoints} holds no checkpoint")
    chosen = [step] if isinstance(step, int) else list(step or [max(available)])
    twice = sorted({n for n in chosen if chosen.count(n) > 1})
    if twice:
        raise RunError(f"step {', '.join(map(str, twice))} is given more than once; the mean weighs steps equally")
    chosen.sort()
    missing = [n for n in chosen if n not in available and n != 0]
    if missing:
        raise RunError(f"{run.path} has no checkpoint of step {', '.join(map(str, missing))}; "
                       f"it has steps {sorted(available)} (and 0: the weights it started from)")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise RunError(f"{out} already exists and is not an empty folder; choose a new --out (nothing was overwritten)")
    configs = {n: load_config(run.config_in_force(n)) for n in chosen}
    for what in ("family", "teacher", "lora_rank", "ema", "student_steps", "first_timestep", "student_timesteps"):
        values = {n: (c.ema_decay > 0 if what == "ema" else getattr(c, what)) for n, c in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:  # repr: student_timesteps is a list
            raise RunError(f"the chosen checkpoints were trained with different {what} ({values}, a resume changed "
                           "it); average only steps trained with one setting")
    last = chosen[-1]
    cfg = configs[last]
    if len(chosen) > 1 and cfg.lora_rank:
        raise RunError("averaging checkpoints of a LoRA run would average the LoRA factors, not their updates; "
                       "export one step")
    # Checkpoints replace the generator's weights, so its starting point need only exist for step 0.
    init = configs[0].generator_init if 0 in chosen else None
    if init and not Path(init).expanduser().is_dir():
        raise RunError(f"step 0 is the weights the run started from, generator_init={init!r}, which is not a folder "
                       f"(from {Path.cwd()}); restore it, run from the folder the run was started in, or leave out step 0")
    trainer = DMD2Trainer(dataclasses.replace(cfg, generator_init=init))

    def student_at(n: int) -> dict:  # the last one stays loaded: the card reports its step counts
        if n:
            load_checkpoint_into(trainer, run.load_checkpoint(available[n]), available[n])
        return trainer.student().state_dict()

    if len(chosen) == 1:
        student_at(last)
    else:  # the sum holds one float64 copy of the student
        trainer.student().load_state_dict(mean_state_dict(student_at(n) for n in chosen))
    note = (f"checkpoint of step {last}" if len(chosen) == 1 else
            f"mean of the weights of the checkpoints of steps {', '.join(map(str, chosen))}") + f" of the run `{run.path}`"
    if 0 in chosen:
        note += f"; step 0 is the weights it started from ({init or 'the teacher'})"
    seconds = max([r["seconds"] for r in run.metrics() if r.get("step", 0) <= last and "seconds" in r], default=0.0)
    # Written beside `out` and renamed at the end: a failure leaves no half-written student behind.
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.family.save_student(trainer.full_student(), tmp, **trainer.student_meta())
        write_student_card(run, cfg, trainer, seconds, command or invocation(), folder=tmp, note=note)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training export",
                                description="Export a run's checkpoint, or the mean of several, as a student folder.")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/mnist-4step")
    p.add_argument("--step", type=int, nargs="+",
                   help="checkpoint step (default: the latest; 0: the weights the run started from); "
                        "several steps: the mean of their weights")
    p.add_argument("--out", required=True, help="new student folder")
    a = p.parse_args(argv)
    out = export_checkpoint(a.run, a.out, a.step)
    print(f"student written to {out}")
