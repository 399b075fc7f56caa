"""Overhead of the DMD2 training step: each step's time over the sum of its network passes timed alone.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--config configs/mnist-1step.yaml] [--repeats 10]

A critic step runs: the generator forward (no grad; k more for a backward-simulated multi-step
student, k drawn at random each step: the generator's calls are counted in every timed step), the fake score forward + backward on its denoising loss, and the GAN head on the fake
score's bottleneck, forward + backward, for a fake and a real batch. A generator step runs: the
generator forward + backward (after the same k no-grad forwards), the real score forward (twice under CFG) and the fake score forward
(no grad), and the bottleneck + head forward + backward to the input. Everything else in a step
(noise draws, losses, clipping, AdamW, EMA, finiteness checks) is overhead. Each part and each
whole step is timed in the same loop, interleaved; per round the step's time is divided by the sum of
the passes it ran, and the median ratio is printed. Target: <= 1.2x.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from training.config import load_config
from training.trainer import DMD2Trainer
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
    calls = [0]
    gen.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def gen_forward():
        with torch.no_grad(), tr.autocast():
            fam.denoise(gen, x_t, t_gen, cond)

    def fake_denoise_fwd_bwd():
        with tr.autocast(), critic.at_step(0):  # step 0: a per-step critic needs one, a plain one ignores it
            out = fam.model_output(fake, x_t, t, cond)
        out.float().square().mean().backward()

    def gan_fwd_bwd(inputs_need_grad: bool):
        def run():
            x = x_t.detach().requires_grad_(inputs_need_grad)
            with tr.autocast(), critic.at_step(0):
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
            critic(x_t, t, cond, call="fake_x0", step=0)

    critic_parts = {"generator forward (no grad), x calls": gen_forward, "fake score fwd+bwd": fake_denoise_fwd_bwd}
    generator_parts = {"generator forward (no grad), x (calls - 1)": gen_forward,
                       "generator fwd+bwd": gen_fwd_bwd, "real + fake score forwards": score_forwards}
    if cfg.use_gan:
        critic_parts["GAN bottleneck+head fwd+bwd x2"] = lambda: (gan_fwd_bwd(False)(), gan_fwd_bwd(False)())
        generator_parts["GAN bottleneck+head fwd+bwd (to input)"] = gan_fwd_bwd(True)

    def frozen_critic(fn):  # as in the generator step: no weight gradients for the critic
        def run():
            with critic.frozen():
                fn()
        return run

    generator_parts = {k: v if k.startswith("generator") else frozen_critic(v) for k, v in generator_parts.items()}
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {"critic step": [], "generator step": []}
    counts: dict[str, list[int]] = {"critic step": [], "generator step": []}
    for r in range(a.repeats + 2):  # two warm-up rounds
        row = {}
        for step, fn in (("critic step", tr.critic_step), ("generator step", tr.generator_step)):
            calls[0] = 0
            row[step] = timed(lambda: fn(real, cond))
            counts[step].append(calls[0])
        for name, fn in {**critic_parts, **generator_parts}.items():
            row[name] = timed(fn)  # a generator forward is timed once and counted per call below
            for m in (gen, critic):
                m.zero_grad(set_to_none=True)
        mult = {"generator forward (no grad), x calls": counts["critic step"][-1],
                "generator forward (no grad), x (calls - 1)": counts["generator step"][-1] - 1}
        for step, parts in (("critic step", critic_parts), ("generator step", generator_parts)):
            total = sum(row[k] * mult.get(k, 1) for k in parts)
            if r >= 2:
                ratios[step].append(row[step] / total)
        if r >= 2:
            for k, v in row.items():
                times.setdefault(k, []).append(v)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, {cfg.student_steps}-step student, "
          f"GAN {'on' if cfg.use_gan else 'off'}, {cfg.mixed_precision}, median of {a.repeats}")
    for step, parts in (("critic step", critic_parts), ("generator step", generator_parts)):
        print(f"\n{step}: {med[step]:.1f} ms (median; generator calls per step: {counts[step][2:]})")
        for k in parts:
            print(f"  {k:<46}{med[k]:>9.1f} ms")
        print(f"  overhead, median over rounds of step / sum of its passes: {statistics.median(ratios[step]):.2f}x "
              f"(target <= 1.2x)")
    print(f"\npeak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
