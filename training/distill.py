"""The DMD2 loop around `training.trainer.DMD2Trainer`: logging, sample grids, quick evaluations,
checkpoints, exact resume and the finished student, all in a run folder (`training.runs`).

    python -m training distill --config configs/mnist-1step.yaml --out runs/NAME [--resume] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dmd2.cli import invocation
from dmd2.images import save_grid, to_uint8
from training.config import DistillConfig, config_text, load_config, save_config
from training.runs import Run, RunError
from training.trainer import DMD2Trainer, NonFiniteLoss


# The one measure the quick evaluation chooses checkpoints and recipes by: the classifier FID, also logged as
# eval/selection. Results are reported with every measure of `python -m dmd2 evaluate`, on fresh samples.
SELECTION = "fid"


def quick_eval(trainer: DMD2Trainer, num: int) -> dict:
    """FID / alignment / diversity of `num` student samples (MNIST evaluator), and eval/selection (the FID)."""
    from dmd2.metrics.mnist import evaluate_images

    labels = np.arange(num) % trainer.family.num_classes
    images = np.concatenate([to_uint8(trainer.sample(labels[i:i + 250], seed=10_000 + i))
                             for i in range(0, num, 250)])
    result = evaluate_images(images, labels)
    scores = {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}
    return {**scores, "eval/selection": result[SELECTION]}


def write_student_card(run: Run, cfg: DistillConfig, trainer: DMD2Trainer, seconds: float, command: str,
                       folder: Path | None = None, note: str | None = None) -> None:
    """MODEL_CARD.md in `folder` (default: the run's student/); `note` says where the weights come from."""
    lines = [
        f"# DMD2 {cfg.student_steps}-step student" + (f" ({note})" if note else ""),
        "",
        f"- teacher: `{cfg.teacher}`",
        f"- timesteps: {trainer.timesteps}",
        f"- steps: {trainer.step} critic updates, {trainer.generator_updates} generator updates (TTUR {cfg.ttur})",
        f"- wall time: {seconds / 60:.1f} min on {trainer.acc.num_processes} process(es), device {trainer.device}",
        f"- weights: {'EMA (decay %s)' % cfg.ema_decay if cfg.ema_decay > 0 else 'raw generator'}",
        f"- command: `{command}`",
    ]
    if cfg.generator_layers_per_block is not None:
        count = lambda net: sum(p.numel() for p in net.parameters()) / 1e6  # noqa: E731
        lines[3:3] = [f"- network: the teacher's with {cfg.generator_layers_per_block} layers per block "
                      f"({count(trainer.generator):.2f} M parameters; the teacher's {count(trainer.real_unet):.2f} M), "
                      + ("started from generator_init" if cfg.generator_init else "started as the teacher") +
                      " (generator_layers_per_block)"]
    if cfg.renoise != "fresh":
        lines[3:3] = [f"- between steps: {cfg.renoise} moves (renoise: {cfg.renoise}, in training and in dmd2.json, which "
                      f"`python -m dmd2` and the app read), not DMD2's fresh re-noising"]
    if cfg.critic_layers_per_block is not None:
        lines[3:3] = [f"- critic: the fake score had {cfg.critic_layers_per_block} layers per block "
                      f"(critic_layers_per_block); the student's network is unchanged by it"]
    guided = cfg.guidance_range is not None
    if guided:  # a guidance-conditioned student: w is an input, any w in its range
        low, high = cfg.guidance_range
        lines[3:3] = [f"- guidance: conditioned on the guidance scale w in [{low:g}, {high:g}] (default "
                      f"{cfg.real_guidance:g}; w drawn {cfg.guidance_sampling} in training), one network "
                      f"evaluation per step, no CFG pass"]
    if cfg.family != "pixel":
        pipe = trainer.family.pipeline_class
        real_cfg = f"at each sample's w in [{low:g}, {high:g}]" if guided else f"{cfg.real_guidance}"
        if not guided and cfg.real_guidance_above is not None:
            real_cfg += f" (w={cfg.real_guidance_above[1]:g} at DM noise levels t >= {cfg.real_guidance_above[0]:g})"
        lines[3:3] = [f"- family: {cfg.family}, {trainer.family.height}x{trainer.family.width}, real-score CFG "
                      f"{real_cfg}" + (f", LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha}" if cfg.lora_rank else "")]
        load = ("pipe.load_lora_weights('student')  # this folder" if cfg.lora_rank else
                "pipe.unet = UNet2DConditionModel.from_pretrained('student')  # this folder")
        # A guided UNet has time_cond_proj_dim: diffusers then passes guidance_scale to it as timestep_cond and
        # runs no CFG pass, so guidance_scale is w itself; a plain student takes none (guidance_scale=0).
        scale = (f"guidance_scale={cfg.real_guidance:g}).images[0]  # any w in [{low:g}, {high:g}]" if guided
                 else "guidance_scale=0).images[0]")
        how = "the guidance scale as a UNet input, no CFG" if guided else "no CFG"
        if hasattr(trainer.family, "card_usage"):  # a family whose students are not UNets says how to use them
            lines += ["", *trainer.family.card_usage(cfg.teacher, list(trainer.timesteps), lora=bool(cfg.lora_rank))]
        else:
            lines += ["", f"Use in plain diffusers (sampling as DMD2's README: LCMScheduler, its timesteps, {how}):", "",
                      "```python", f"from diffusers import {pipe}, LCMScheduler, UNet2DConditionModel",
                      f"pipe = {pipe}.from_pretrained('{cfg.teacher}')", load,
                      "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)",
                      f"image = pipe('a photo of a cat', timesteps={list(trainer.timesteps)}, {scale}",
                      "```"]
    lines += ["", f"Config: see `config.yaml` in the run folder `{run.path}`."]
    (Path(folder or run.student) / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def save_checkpoint(run: Run, trainer: DMD2Trainer, cfg: DistillConfig) -> None:
    """A checkpoint in cfg.checkpoint_format; every rank calls it. "full": the states gathered on rank 0, which
    writes state.pt; "sharded": every rank writes its own DCP shards, rank 0 state.pt with the rest."""
    acc = trainer.acc
    if cfg.checkpoint_format == "sharded":
        run.save_checkpoint(trainer.step, trainer.state_dict(sharded=True), keep=cfg.keep_checkpoints,
                            shards=trainer.sharded_state(), main=acc.is_main_process, barrier=acc.wait_for_everyone)
        return
    state = trainer.state_dict()
    if acc.is_main_process:
        run.save_checkpoint(trainer.step, state, keep=cfg.keep_checkpoints)


def load_checkpoint_into(trainer: DMD2Trainer, state: dict, path: Path) -> None:
    """trainer.load_state_dict with a clear error when the checkpoint's networks differ from the config's.

    Reads either format, whatever cfg.checkpoint_format says (a sharded one through its dcp/ folder; DCP
    reshards, so any number of processes can read it)."""
    try:
        trainer.load_state_dict(state, read_shards=lambda template: Run.read_shards(path, template))
    except RuntimeError as e:  # torch's strict load: missing / unexpected / reshaped tensors
        first = str(e).strip().splitlines()[0]
        raise RunError(f"checkpoint {path} does not fit the config: {first} (settings that change the networks, "
                       f"such as critic_per_step, lora_rank, the *_layers_per_block or the GAN weights being 0, "
                       f"cannot change on resume)") from None


def distill(cfg: DistillConfig, out: str | Path, resume: bool = False, accelerator=None,
            stop_after: int | None = None, command: str | None = None, teacher=None) -> Run:
    """Run (or resume) a distillation into the run folder `out`; returns the Run.

    stop_after: leave the loop after this step, keeping the schedule of all `cfg.iterations` (`--stop-after`;
    tests use it to simulate an interruption).
    """
    run = Run(out)
    if run.config_path.is_file() and not resume:
        raise RunError(f"{run.path} already holds a run; pass --resume to continue it or choose another --out")
    trainer = DMD2Trainer(cfg, accelerator, teacher=teacher)
    acc, main = trainer.acc, trainer.acc.is_main_process
    command = command or invocation()
    if resume and run.checkpoint_dirs():
        load_checkpoint_into(trainer, run.load_checkpoint(), run.checkpoint_dirs()[-1])
        if main:
            run.truncate_metrics(trainer.step)
            if run.config_path.is_file() and run.config_path.read_text() != config_text(cfg):
                # A resume with changed values (--set): keep the old config beside the new one.
                run.keep_config_before(trainer.step)
                save_config(cfg, run.config_path)
    elif main:
        run.create()
        save_config(cfg, run.config_path)
    acc.wait_for_everyone()
    if main:
        run.set_status("running", step=trainer.step, total_steps=cfg.iterations, pid=os.getpid(), error=None,
                       started=time.time(), mixed_precision=trainer.mixed_precision)
    fixed_labels = trainer.grid_specs()
    start, window, window_start = time.time(), defaultdict(list), time.time()
    last = stop_after if stop_after is not None else cfg.iterations
    try:
        while trainer.step < min(cfg.iterations, last):
            stats = trainer.train_step()
            step = trainer.step
            for k, v in stats.items():
                window[k].append(v)
            if main and (step % cfg.log_every == 0 or step == cfg.iterations):
                elapsed = time.time() - window_start
                n_steps = len(window["critic/fake_denoise"])
                record = {"step": step, "generator_updates": trainer.generator_updates,
                          "seconds": round(time.time() - start, 2),
                          "images_per_s": n_steps * cfg.batch_size * acc.num_processes / max(elapsed, 1e-9),
                          "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
                record.update({k: float(np.mean(v)) for k, v in window.items()})
                run.log_metrics(record)
                run.set_status("running", step=step, total_steps=cfg.iterations)
                window, window_start = defaultdict(list), time.time()
            # Under FSDP every rank runs the sharded generator's forwards; rank 0 writes.
            if (main or trainer.sharded) and cfg.sample_every and step % cfg.sample_every == 0:
                grid = to_uint8(trainer.sample(fixed_labels, seed=1234))
                if main:
                    save_grid(grid, run.sample_path(step), cols=min(10, len(grid)))
                    save_grid(grid, run.samples / "latest.png", cols=min(10, len(grid)))
            if (main or trainer.sharded) and cfg.eval_every and step % cfg.eval_every == 0:
                scores = quick_eval(trainer, cfg.eval_num)
                if main:
                    run.log_metrics({"step": step, "seconds": round(time.time() - start, 2), **scores})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                acc.wait_for_everyone()
                save_checkpoint(run, trainer, cfg)
    except NonFiniteLoss as e:
        if main:
            run.set_status("failed", step=trainer.step, error=str(e))
        raise
    acc.wait_for_everyone()
    finished = trainer.step >= cfg.iterations
    if finished:
        if not cfg.checkpoint_every or trainer.step % cfg.checkpoint_every:
            save_checkpoint(run, trainer, cfg)
        student = trainer.full_student()
    if finished and main:
        trainer.family.save_student(student, run.student, **trainer.student_meta())
        write_student_card(run, cfg, trainer, time.time() - start, command)
        run.set_status("finished", step=trainer.step, total_steps=cfg.iterations)
    elif main:
        run.set_status("stopped", step=trainer.step, total_steps=cfg.iterations)
    acc.wait_for_everyone()
    run.trainer = trainer  # for tests and scripts that want the final models
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training distill", description="DMD2 distillation.")
    p.add_argument("--config", help="YAML preset (configs/*.yaml); on --resume defaults to the run's config.yaml")
    p.add_argument("--out", required=True, help="run folder, e.g. runs/mnist-1step")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set iterations=500")
    p.add_argument("--stop-after", type=int, metavar="N", help="leave the run after iteration N (status 'stopped'; "
                   "saved when N is a multiple of checkpoint_every), keeping the LR schedule of all `iterations`")
    a = p.parse_args(argv)
    if a.stop_after is not None and a.stop_after < 1:
        raise RunError(f"--stop-after must be at least 1, got {a.stop_after}")
    run = Run(a.out)
    config = a.config
    if a.resume and config is None:
        if not run.config_path.is_file():
            raise RunError(f"--resume: {run.config_path} not found")
        config = run.config_path
    cfg = load_config(config, a.overrides)

    def on_term(signum, frame):  # the app's Stop button sends SIGTERM to the process group
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    main_rank = int(os.environ.get("RANK", "0")) == 0     # under DDP/FSDP only rank 0 writes the status
    try:
        distill(cfg, a.out, resume=a.resume, stop_after=a.stop_after)
    except KeyboardInterrupt:
        if main_rank and run.status_path.is_file():
            run.set_status("stopped", error="stopped by signal")
        raise
    except Exception as e:
        if main_rank and run.status_path.is_file() and run.status().get("state") == "running":
            run.set_status("failed", error=f"{type(e).__name__}: {e}")
        raise
