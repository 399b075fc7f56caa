"""How much a deeper 1-step student's added layers contribute (generator_layers_per_block).

A deepened generator starts as the teacher, its added layers identities (training/deepen.py). After training, the
same student with those layers reset to identities is the network of the teacher's shape inside it. From the same
noise and labels, the script compares three 1-step outputs at t=999: the student's, the student's without its added
layers, and the start's (the teacher's one-step prediction), and prints the added layers' share of how far the
student moved from its start, rms(student - without) / rms(student - start), with the weight norms behind it.

    python scripts/added_layers.py --student runs/seeds/mnist-1step-fast-deep2-seed0/student \
        --teacher assets/mnist/teacher [--num 500] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dmd2.families.base import read_json_object
from dmd2.families.pixel import PixelFamily, load_pixel_unet
from dmd2.sampling import cycled_labels, initial_noise, student_sample
from training.deepen import teacher_key, without_added_layers


def rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


@torch.no_grad()
def contribution(student, teacher, family: PixelFamily, num: int = 500, seed: int = 0) -> dict:
    """The added layers' share of the student's move from its start, and their last layers' weight norms
    beside the copied layers' (both the conv2 of each resnet)."""
    teacher_layers, layers = teacher.config.layers_per_block, student.config.layers_per_block
    if layers <= teacher_layers:
        raise ValueError(f"the student has {layers} layers per block, the teacher {teacher_layers}: nothing was added")
    modes = student.training, teacher.training
    cond = family.condition(cycled_labels(num, family.num_classes).tolist())
    noise = initial_noise(family, num, seed)
    out = {name: student_sample(family, net.eval(), cond, noise, [999], seed=seed)
           for name, net in (("student", student), ("without", without_added_layers(student, teacher_layers)),
                             ("start", teacher))}
    norms = {"added": [], "copied": []}
    for name, p in student.named_parameters():
        if name.endswith(".conv2.weight") and ("down_blocks" in name or "up_blocks" in name):
            added = teacher_key(name, teacher_layers, layers) is None
            norms["added" if added else "copied"].append(float(p.norm()))
    student.train(modes[0]), teacher.train(modes[1])
    moved = rms(out["student"] - out["start"])
    return {"moved_from_start": moved, "added_layers": rms(out["student"] - out["without"]),
            "share": rms(out["student"] - out["without"]) / moved if moved > 0 else 0.0,
            "without_from_start": rms(out["without"] - out["start"]),
            "conv2_norm_added": sum(norms["added"]) / len(norms["added"]),
            "conv2_norm_copied": sum(norms["copied"]) / len(norms["copied"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", required=True, help="a deepened 1-step student folder")
    ap.add_argument("--teacher", default="assets/mnist/teacher")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    timesteps = read_json_object(Path(args.student) / "dmd2.json").get("timesteps", [999])
    if list(timesteps) != [999]:  # the probe compares one step at t=999 (a student's start there is the teacher's)
        raise SystemExit(f"error: {args.student} samples at timesteps {timesteps}; the probe is for 1-step students "
                         f"at t=999")
    teacher = load_pixel_unet(args.teacher)
    family = PixelFamily.from_unet(teacher, folder=args.teacher)
    r = contribution(load_pixel_unet(args.student), teacher, family, args.num, args.seed)
    print(f"rms(student - start) = {r['moved_from_start']:.4f}; rms(student - without added layers) = "
          f"{r['added_layers']:.4f}; share = {r['share']:.3f}; rms(without - start) = {r['without_from_start']:.4f}")
    print(f"mean conv2 weight norm: added layers {r['conv2_norm_added']:.4f}, "
          f"copied layers {r['conv2_norm_copied']:.4f}")


if __name__ == "__main__":
    main()
