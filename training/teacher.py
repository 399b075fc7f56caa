"""Train a small class-conditional pixel teacher (the embedded MNIST default, or a folder of images).

    python -m training teacher --data mnist5k --out runs/teacher --steps 3000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from dmd2.cli import invocation
from dmd2.families.pixel import DEFAULT_UNET_CONFIG, PixelFamily
from dmd2.schedule import FlowSchedule
from dmd2.sampling import bf16_is_native
from training.data import InfiniteSampler, load_dataset


def train_teacher(
    data: str = "mnist5k",          # 'mnist5k' or a folder with one sub-folder of images per class
    out: str = "runs/teacher",      # output folder: EMA weights (diffusers format), log, card facts
    steps: int = 3000,              # optimiser steps
    batch_size: int = 128,          # images per step
    lr: float = 5e-4,               # AdamW learning rate after warm-up
    warmup: int = 200,              # linear LR warm-up steps
    ema_decay: float = 0.999,       # EMA of the weights; the EMA is what gets saved
    label_dropout: float = 0.1,     # fraction of labels replaced by the null class (for CFG)
    bf16: bool | None = None,       # bf16 autocast; None: where the CPU (AVX512-BF16, AMX) or GPU has it
    seed: int = 0,                  # seeds init, data order, noise and timesteps
    image_size: int = 32,           # folder data is resized to this
    channels: int = 1,              # 1 (grey) or 3 (RGB)
    block_out_channels: tuple = (32, 64, 64),  # UNet widths per resolution
    objective: str = "v",           # "v": v-prediction on the cosine DDPM schedule; "flow": rectified flow
    flow_shift: float = 1.0,        # objective "flow": the timestep shift of its schedule (1: none)
    log_every: int = 50,            # steps between log lines
    save_every: int = 500,          # steps between snapshots of the EMA weights
    device: str = "cpu",
) -> Path:
    """Train with the v-prediction MSE (or the flow-velocity MSE) at uniform t; returns the output folder."""
    if objective not in ("v", "flow"):
        raise ValueError(f"objective must be 'v' or 'flow', got {objective!r}")
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = load_dataset(data, image_size, channels)
    num_classes = int(labels.max()) + 1
    family = PixelFamily(num_classes=num_classes, image_size=image_size, channels=channels,
                         schedule=FlowSchedule(flow_shift) if objective == "flow" else None)
    unet = family.new_unet(
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D",) * (len(block_out_channels) - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(block_out_channels) - 1),
        # at least one attention head when the last width is narrower than the default head dim
        attention_head_dim=min(DEFAULT_UNET_CONFIG["attention_head_dim"], block_out_channels[-1]),
    ).to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    sampler = InfiniteSampler(len(images), batch_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"teacher: {n_params / 1e6:.2f}M parameters, {len(images)} images, {num_classes} classes", flush=True)

    if bf16 is None:
        bf16 = bf16_is_native(device)
    log = open(out / "train_log.jsonl", "a")
    start = time.time()
    for step in range(1, steps + 1):
        idx = sampler.next()
        x0, y = images[idx].to(device), labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < label_dropout] = num_classes
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, family.schedule.num_train_timesteps, (len(x0),), generator=gen).to(device)
        x_t = family.schedule.add_noise(x0, noise, t)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            pred = family.model_output(unet, x_t, t, y.to(device))
        loss = (pred.float() - family.schedule.target(x0, noise, t, family.prediction_type)).pow(2).mean()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"teacher loss is {loss.item()} at step {step}; last snapshot kept in {out}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - min(ema_decay, (1 + step) / (10 + step)))
        if step % log_every == 0 or step == steps:
            rec = dict(step=step, loss=loss.item(), grad_norm=grad_norm.item(), lr=sched.get_last_lr()[0],
                       seconds=round(time.time() - start, 1))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if step % save_every == 0 or step == steps:
            family.save_student(ema, out)  # weights + scheduler_config.json (the schedule it was trained on)
            facts = dict(command=invocation(), steps_done=step,
                         train_seconds=round(time.time() - start, 1), parameters=n_params,
                         data=data, batch_size=batch_size, lr=lr, ema_decay=ema_decay,
                         label_dropout=label_dropout, bf16=bf16, seed=seed, objective=objective,
                         **({"flow_shift": flow_shift} if objective == "flow" else {}),
                         torch_threads=torch.get_num_threads())
            (out / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    log.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training teacher", description=train_teacher.__doc__)
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                   help="bf16 autocast (default: where the hardware has bf16 units)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--widths", type=lambda s: tuple(int(v) for v in s.split(",")), default=(32, 64, 64))
    p.add_argument("--objective", choices=("v", "flow"), default="v",
                   help="v: v-prediction on the cosine DDPM schedule; flow: rectified flow (velocity eps - x0)")
    p.add_argument("--flow-shift", type=float, default=1.0, help="--objective flow: the timestep shift (1: none)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=500)
    a = p.parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if not (math.isfinite(a.flow_shift) and a.flow_shift > 0):
        p.error(f"--flow-shift must be a positive number, got {a.flow_shift}")
    if not 0 <= a.label_dropout < 1:
        p.error(f"--label-dropout must be in [0, 1), got {a.label_dropout}")
    train_teacher(data=a.data, out=a.out, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                  ema_decay=a.ema_decay, label_dropout=a.label_dropout, bf16=a.bf16, seed=a.seed,
                  image_size=a.image_size, channels=a.channels, block_out_channels=a.widths,
                  objective=a.objective, flow_shift=a.flow_shift, log_every=a.log_every, save_every=a.save_every)
