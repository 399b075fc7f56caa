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

    OMP_NUM_THREADS=2 python benchmarks/train_step.py --compare-precision [--config ...] [--repeats 3]

times fp32 against bf16 autocast trainers (same config and seed) and prints bf16 over fp32: on a CPU without
bf16 units (AVX2 only) autocast is emulated and many times slower, which is why the MNIST presets say
`mixed_precision: auto`.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --compare-compile [--config ...] [--repeats 5]

builds trainers from the same config and seed: eager, channels_last, and torch.compile + channels_last
(the config switches `compile` and `channels_last`). Each first runs one TTUR cycle (`ttur` iterations:
critic steps and a generator step) as warm-up, timed apart (for the compiled one: compilation), then
one more untimed; then rounds of one cycle each, interleaved, and prints each one's median step time,
its ratio to eager, the warm-up time, torch._dynamo's graph count after warm-up and after timing (a
growing count means recompiles), how far the first cycle's losses are from eager's, and the max abs
difference of the compiled generator's output from its own eager forward (same weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import time

import torch

from dmd2.sampling import bf16_is_native
from training.config import load_config
from training.trainer import DMD2Trainer
from training.simulate import randn


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def graphs() -> int:
    """FX graphs torch._dynamo has compiled in this process so far (all networks, all recompiles)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cycle(tr: DMD2Trainer) -> list[dict]:
    """One TTUR cycle: `ttur` iterations, the last with a generator update; each iteration's stats."""
    return [tr.train_step() for _ in range(tr.cfg.ttur)]


def compare_compile(cfg, repeats: int) -> None:
    """Eager vs channels_last vs torch.compile + channels_last trainers, same config and seed (module doc)."""
    variants = {"eager": {}, "channels_last": {"channels_last": True},
                "compile + channels_last": {"compile": True, "channels_last": True}}
    trainers, warmup, first, counts = {}, {}, {}, {}
    for name, switches in variants.items():
        before = graphs()
        tr = trainers[name] = DMD2Trainer(dataclasses.replace(cfg, **switches).validate())
        warmup[name] = timed(lambda: first.__setitem__(name, cycle(tr)))
        cycle(tr)  # a second untimed cycle: what a recompile on a second call would cost lands here
        counts[name] = [graphs() - before]
    times = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, tr in trainers.items():
            times[name].append(timed(lambda: cycle(tr)) / cfg.ttur)
    compiled = trainers["compile + channels_last"]
    counts["compile + channels_last"].append(graphs() - sum(counts[n][0] for n in counts))
    # The compiled generator against its own eager forward (nn.Module.compile compiles __call__ only), on the
    # same weights and inputs: what compiling alone changes in a student's output.
    fam, n = compiled.family, cfg.batch_size
    _, cond = compiled.real_batch()
    x = randn(fam.latent_shape(n), compiled.rng, compiled.device)
    t = fam.schedule.timesteps(compiled.timesteps[0], n, compiled.device)
    gen = compiled.generator_module
    with torch.no_grad(), compiled.autocast():
        out_compiled = fam.model_output(gen, x, t, cond).float()
        out_eager = gen.forward(x, fam.schedule.model_timestep(t), class_labels=cond).sample.float()
    diff = (out_compiled - out_eager).abs().max().item()

    def loss_gap(name: str) -> float:
        return max(abs(a[k] - b[k]) for a, b in zip(first["eager"], first[name]) for k in a
                   if k.endswith(("fake_denoise", "gan_critic", "/dm", "gan_generator")))

    eager = statistics.median(times["eager"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, {cfg.student_steps}-step student, "
          f"GAN {'on' if cfg.use_gan else 'off'}, {compiled.mixed_precision}, TTUR {cfg.ttur}, median of {repeats} "
          f"cycles of {cfg.ttur} iterations each")
    print(f"\n{'trainer':<26}{'step s':>9}{'/ eager':>9}{'warm-up s':>11}{'graphs':>8}{'first-cycle loss gap':>22}")
    for name in trainers:
        med = statistics.median(times[name])
        graphs_text = "+".join(str(c) for c in counts.get(name, [0])) if name.startswith("compile") else "-"
        gap = "-" if name == "eager" else f"{loss_gap(name):.2e}"
        print(f"{name:<26}{med:>9.3f}{med / eager:>8.2f}x{warmup[name]:>11.1f}{graphs_text:>8}{gap:>22}")
    print(f"\nwarm-up: the first {cfg.ttur} iterations (for the compiled trainer, compilation of every pass); graphs: "
          f"compiled during the two warm-up cycles + during the timed cycles (0: no recompiles)")
    print(f"compiled generator vs its own eager forward (same weights, batch {n}, t={compiled.timesteps[0]}): "
          f"max abs diff {diff:.2e} (output std {out_eager.std().item():.2f})")


def compare_precision(cfg, repeats: int) -> None:
    """fp32 vs bf16 autocast trainers, same config and seed: one TTUR cycle each as warm-up, then `repeats`
    interleaved cycles; prints each one's median step time and bf16 over fp32, and whether this machine has
    bf16 units (what `mixed_precision: auto` decides on)."""
    trainers = {p: DMD2Trainer(dataclasses.replace(cfg, mixed_precision=p).validate()) for p in ("no", "bf16")}
    for tr in trainers.values():
        cycle(tr)
    times = {p: [] for p in trainers}
    for _ in range(repeats):
        for p, tr in trainers.items():
            times[p].append(timed(lambda: cycle(tr)) / cfg.ttur)
    fp32, bf16 = (statistics.median(times[p]) for p in ("no", "bf16"))
    device = trainers["no"].device
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device.type} "
          f"(CPU capability {torch.backends.cpu.get_cpu_capability()}), bf16 units: {bf16_is_native(device)}, "
          f"batch {cfg.batch_size}, {cfg.student_steps}-step student, median of {repeats} cycles of {cfg.ttur} "
          f"iterations each")
    print(f"fp32 step {fp32:.3f} s, bf16 autocast step {bf16:.3f} s: bf16 / fp32 = {bf16 / fp32:.2f}x "
          f"(mixed_precision: auto takes {'bf16' if bf16_is_native(device) else 'fp32'} here)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist-1step.yaml")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compare-compile", action="store_true",
                   help="time eager vs channels_last vs torch.compile + channels_last trainers instead")
    p.add_argument("--compare-precision", action="store_true",
                   help="time fp32 vs bf16 autocast trainers instead")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    if a.compare_precision:
        compare_precision(cfg, a.repeats)
        return
    if a.compare_compile:
        compare_compile(cfg, a.repeats)
        return
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
          f"GAN {'on' if cfg.use_gan else 'off'}, {tr.mixed_precision}, median of {a.repeats}")
    for step, parts in (("critic step", critic_parts), ("generator step", generator_parts)):
        print(f"\n{step}: {med[step]:.1f} ms (median; generator calls per step: {counts[step][2:]})")
        for k in parts:
            print(f"  {k:<46}{med[k]:>9.1f} ms")
        print(f"  overhead, median over rounds of step / sum of its passes: {statistics.median(ratios[step]):.2f}x "
              f"(target <= 1.2x)")
    print(f"\npeak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
