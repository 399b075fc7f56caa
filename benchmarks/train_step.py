"""Overhead of the DMD2 training step: each step's time over the sum of its network passes timed alone.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--config configs/mnist-1step.yaml] [--repeats 10]

A critic step runs: the generator forward (no grad; k more for a backward-simulated multi-step
student), the fake score forward + backward on its denoising loss, and the GAN head on the fake
score's bottleneck, forward + backward, for a fake and a real batch. A generator step runs: the
generator forward + backward, the real score forward (twice under CFG) and the fake score forward
(no grad), and the bottleneck + head forward + backward to the input. Everything else in a step
(noise draws, losses, clipping, AdamW, EMA, finiteness checks) is overhead. Each part and each
whole step is timed in the same loop, interleaved, and the medians are compared. Target: <= 1.2x.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from training.config import load_config
from training.distill import DMD2Trainer
from training.simulate import randn


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist-1step.yaml")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    tr = DMD2Trainer(cfg)
    fam, n = tr.family, cfg.batch_size
    T = fam.schedule.num_train_timesteps
    real, cond = tr.real_batch()
    gen, fake, teacher, critic = tr.generator_module, tr.critic_module.fake_unet, tr.real_unet, tr.critic_module
    x_t = randn(fam.latent_shape(n), tr.rng, tr.device)
    t_gen = torch.full((n,), tr.timesteps[0], dtype=torch.long)
    t = tr._randint(0, T, n)
    k_sim = len(tr.timesteps) - 1 if cfg.backward_simulation else 0  # worst case of backward simulation

    def gen_forward():
        with torch.no_grad(), tr.autocast():
            for _ in range(1 + k_sim):
                fam.denoise(gen, x_t, t_gen, cond)

    def fake_denoise_fwd_bwd():
        with tr.autocast():
            out = fam.model_output(fake, x_t, t, cond)
        out.float().square().mean().backward()

    def gan_fwd_bwd(inputs_need_grad: bool):
        def run():
            x = x_t.detach().requires_grad_(inputs_need_grad)
            with tr.autocast():
                logits = critic.gan_head(fam.bottleneck(fake, x, t, cond))
            logits.float().mean().backward()
        return run

    def gen_fwd_bwd():
        with tr.autocast():
            x = fam.denoise(gen, x_t, t_gen, cond)
        x.float().square().mean().backward()

    def score_forwards():
        with torch.no_grad(), tr.autocast():
            fam.denoise(teacher, x_t, t, cond, guidance=cfg.real_guidance)
            critic.fake_x0(x_t, t, cond)

    critic_parts = {"generator forward (no grad)": gen_forward, "fake score fwd+bwd": fake_denoise_fwd_bwd}
    generator_parts = {"generator fwd+bwd": gen_fwd_bwd, "real + fake score forwards": score_forwards}
    if cfg.use_gan:
        critic_parts["GAN bottleneck+head fwd+bwd x2"] = lambda: (gan_fwd_bwd(False)(), gan_fwd_bwd(False)())
        generator_parts["GAN bottleneck+head fwd+bwd (to input)"] = gan_fwd_bwd(True)

    def frozen_critic(fn):  # as in the generator step: no weight gradients for the critic
        def run():
            with critic.frozen():
                fn()
        return run

    generator_parts = {k: v if k == "generator fwd+bwd" else frozen_critic(v) for k, v in generator_parts.items()}
    times: dict[str, list[float]] = {}
    for r in range(a.repeats + 2):  # two warm-up rounds
        row = {"critic step": timed(lambda: tr.critic_step(real, cond)),
               "generator step": timed(lambda: tr.generator_step(real, cond))}
        for name, fn in {**critic_parts, **generator_parts}.items():
            row[name] = timed(fn)
            for m in (gen, critic):
                m.zero_grad(set_to_none=True)
        if r >= 2:
            for k, v in row.items():
                times.setdefault(k, []).append(v)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, {cfg.student_steps}-step student, "
          f"GAN {'on' if cfg.use_gan else 'off'}, {cfg.mixed_precision}, median of {a.repeats}")
    for step, parts in (("critic step", critic_parts), ("generator step", generator_parts)):
        total = sum(med[k] for k in parts)
        print(f"\n{step}: {med[step]:.1f} ms")
        for k in parts:
            print(f"  {k:<42}{med[k]:>9.1f} ms")
        print(f"  {'sum of network passes':<42}{total:>9.1f} ms")
        print(f"  overhead: {med[step] / total:.2f}x (target <= 1.2x)")
    print(f"\npeak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
