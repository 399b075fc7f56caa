"""What the second fake-score bottleneck pass of a non-reverse-KL `dm_divergence` costs in training.

    OMP_NUM_THREADS=1 python benchmarks/divergence_pass.py [--config configs/recall/mnist-1step-fast-js.yaml] [--repeats 5]

With `dm_divergence: forward-kl` or `js` the generator step reads the density ratio from the GAN head at the DM
term's noisy samples: a no-grad pass of the fake score's down path and mid block, on the same input as the fake
score's full x0 pass just before it (`DMD2Trainer.generator_step`). One fused pass could share it; this prints
that pass's time beside a whole TTUR cycle's (`ttur` iterations, one generator update), measured interleaved in
one run, to say whether fusing is worth it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from training.config import load_config
from training.simulate import randn
from training.trainer import DMD2Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/recall/mnist-1step-fast-js.yaml")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    cfg = load_config(a.config)
    if cfg.dm_divergence == "reverse-kl":
        raise SystemExit(f"{a.config}: dm_divergence is reverse-kl, which has no second pass; pick a forward-kl or js config")
    tr = DMD2Trainer(cfg)
    fam, n = tr.family, cfg.batch_size
    _, cond = tr.real_batch()
    x = randn(fam.latent_shape(n), tr.rng, tr.device)
    t = tr._randint(0, fam.schedule.num_train_timesteps, n)
    eps = randn(x.shape, tr.rng, tr.device)

    def second_pass():      # as in generator_step: the GAN head's logits at the DM term's noisy samples
        with tr.critic_module.frozen(), torch.no_grad(), tr.autocast():
            tr.critic(x, cond, t, eps, call="realism_logits", step=0)

    def cycle():
        for _ in range(cfg.ttur):
            tr.train_step()

    second_pass(), cycle()      # warm-up
    times = {"pass": [], "cycle": []}
    for _ in range(a.repeats):
        for name, fn in (("pass", second_pass), ("cycle", cycle)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    extra, whole = (statistics.median(times[k]) for k in ("pass", "cycle"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, {cfg.dm_divergence}, "
          f"{tr.mixed_precision}, median of {a.repeats}")
    print(f"second bottleneck pass {extra * 1000:.1f} ms; TTUR cycle ({cfg.ttur} iterations, 1 generator update) "
          f"{whole * 1000:.0f} ms; ratio {extra / whole:.4f} ({extra / whole * 100:.2f}% of training time)")


if __name__ == "__main__":
    main()
