"""Real-size SDXL on one CUDA GPU: step overhead, peak memory, sampling throughput (issue 17).

    python benchmarks/sdxl_gpu.py [--json sdxl_gpu.json] [--repeats 3]      # one CUDA GPU, ~4-6 min
    python benchmarks/sdxl_gpu.py --tiny [--json out.json]                  # the same code on CPU, seconds

What runs: a pipeline folder written by `build_pipeline` and loaded through the real loader, with
- the UNet of configs/real_unets/sdxl-base.json (2.57B parameters), random weights (saved in bf16);
- text encoders of the real widths (CLIP 768 and OpenCLIP-bigG 1280, projection 1280, 77 tokens) but ONE
  layer each and a tiny BPE vocabulary (random): the UNet sees real-shaped conditions; encoding costs nothing;
- a VAE of the real SDXL config (AutoencoderKL 128-256-512-512, 84M parameters), random weights;
at 1024 px (128x128 latents), batch 2, with the settings of configs/sdxl-4step.yaml ("full": full fine-tuning,
gradient checkpointing, bf16 frozen parts) and configs/sdxl-4step-lora.yaml ("lora": LoRA r64, gradient
checkpointing, bf16 teacher and LoRA base). `--tiny`: a scaled-down UNet config (same SDXL widths for the
text, 2 blocks of 8/16 channels) at 64 px on CPU.

Measured, per mode:
- the critic step and the generator step, each over the sum of its network passes timed alone in the same
  loop, interleaved (as benchmarks/train_step.py does for MNIST; median over rounds; target <= 1.2x);
- peak GPU memory (torch.cuda.max_memory_allocated / _reserved) over critic + generator steps; on CPU the
  process' peak RSS (not resettable between modes: read it as an upper bound);
and, with the teacher UNet (the same network as a full student), images/s of the teacher's 50-step DDIM with
CFG vs the 4-step and 1-step student samplers, VAE decode included. A mode that runs out of memory is
recorded as such ("ok": false, "error") and the rest still runs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_sd's offline CLIP tokenizer

from dmd2.sampling import bf16_is_native  # noqa: E402
from training.config import load_config  # noqa: E402
from training.simulate import randn  # noqa: E402
from training.trainer import DMD2Trainer  # noqa: E402

GIB = 2 ** 30
TOKENS = 77  # the real CLIP sequence length: the cross-attention runs at its real size
MODES = {"full": "configs/sdxl-4step.yaml", "lora": "configs/sdxl-4step-lora.yaml"}
CAPTIONS = ("a photo of a cat", "a red dog", "a blue photo", "a photo of a dog")


def tiny_unet_config() -> dict:
    """The real SDXL UNet config scaled down (2 blocks of 8/16 channels), keeping its text and micro-cond widths."""
    cfg = json.loads((ROOT / "configs/real_unets/sdxl-base.json").read_text())
    cfg.update(block_out_channels=[8, 16], layers_per_block=1, transformer_layers_per_block=[1, 1],
               attention_head_dim=[2, 2], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], norm_num_groups=4, sample_size=8)
    return cfg


def _tokenizer(pad_token: str):
    import tiny_sd

    tok = tiny_sd.tiny_clip_tokenizer(pad_token=pad_token)
    tok.model_max_length = tok.init_kwargs["model_max_length"] = TOKENS
    return tok


def build_pipeline(folder: Path, unet_config: dict, device: str) -> Path:
    """An SDXL pipeline folder: UNet of `unet_config` (random, bf16 files), 1-layer text encoders of the real
    widths, the real-config VAE (random), the real Euler scheduler config."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, tok2 = _tokenizer("<|endoftext|>"), _tokenizer("!")

    def text_config(hidden: int, heads: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=heads, max_position_embeddings=TOKENS, projection_dim=1280,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # SDXL's UNet in fp32 alone is 10 GB: initialise it in bf16
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(unet_config)
    finally:
        torch.set_default_dtype(default)
    StableDiffusionXLPipeline(
        unet=unet.to("cpu"), vae=vae, text_encoder=CLIPTextModel(text_config(768, 12)),
        text_encoder_2=CLIPTextModelWithProjection(text_config(1280, 20)), tokenizer=tok, tokenizer_2=tok2,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False).save_pretrained(folder)
    return folder


def unet_params(unet_config: dict) -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel.from_config(unet_config).parameters())


def caption_folder(root: Path, size: int) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, text in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return root


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def step_overhead(tr: DMD2Trainer, repeats: int) -> dict:
    """Critic and generator step times over the sum of their passes, interleaved (benchmarks/train_step.py's method)."""
    cfg, fam, n = tr.cfg, tr.family, tr.cfg.batch_size
    T = fam.schedule.num_train_timesteps
    real, cond = tr.real_batch()
    gen, fake, teacher, critic = tr.generator_module, tr.critic_module.fake_unet, tr.real_unet, tr.critic_module
    x_t = randn(fam.latent_shape(n), tr.rng, tr.device)
    t_gen = torch.full((n,), tr.timesteps[0], dtype=torch.long, device=tr.device)
    t = tr._randint(0, T, n)
    calls = [0]
    hook = gen.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def gen_forward():
        with torch.no_grad(), tr.autocast():
            fam.denoise(gen, x_t, t_gen, cond)

    def fake_denoise_fwd_bwd():
        with tr.autocast(), critic.at_step(0):
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

    def frozen_critic(fn):
        def run():
            with critic.frozen():
                fn()
        return run

    critic_parts = {"generator forward (no grad), x calls": gen_forward, "fake score fwd+bwd": fake_denoise_fwd_bwd}
    generator_parts = {"generator forward (no grad), x (calls - 1)": gen_forward, "generator fwd+bwd": gen_fwd_bwd,
                       "real + fake score forwards": frozen_critic(score_forwards)}
    if cfg.use_gan:
        critic_parts["GAN bottleneck+head fwd+bwd x2"] = lambda: (gan_fwd_bwd(False)(), gan_fwd_bwd(False)())
        generator_parts["GAN bottleneck+head fwd+bwd (to input)"] = frozen_critic(gan_fwd_bwd(True))
    times: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {"critic step": [], "generator step": []}
    counts: dict[str, list[int]] = {"critic step": [], "generator step": []}
    for r in range(repeats + 1):  # one warm-up round
        row = {}
        for step, fn in (("critic step", tr.critic_step), ("generator step", tr.generator_step)):
            calls[0] = 0
            row[step] = timed(lambda: fn(real, cond))
            counts[step].append(calls[0])
        for name, fn in {**critic_parts, **generator_parts}.items():
            row[name] = timed(fn)
            for m in (gen, critic):
                m.zero_grad(set_to_none=True)
        mult = {"generator forward (no grad), x calls": counts["critic step"][-1],
                "generator forward (no grad), x (calls - 1)": counts["generator step"][-1] - 1}
        if r >= 1:
            for step, parts in (("critic step", critic_parts), ("generator step", generator_parts)):
                ratios[step].append(row[step] / sum(row[k] * mult.get(k, 1) for k in parts))
            for k, v in row.items():
                times.setdefault(k, []).append(v)
    hook.remove()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {"critic_step_ms": med["critic step"], "generator_step_ms": med["generator step"],
            "critic_step_ratio": statistics.median(ratios["critic step"]),
            "generator_step_ratio": statistics.median(ratios["generator step"]),
            "passes_ms": {k: v for k, v in med.items() if not k.endswith(" step")},
            "generator_calls": {k: v[1:] for k, v in counts.items()}}


def sampling_throughput(tr: DMD2Trainer, batch: int, repeats: int) -> dict:
    """images/s of the teacher's 50-step DDIM + CFG and of the 4- and 1-step student samplers (VAE decode included)."""
    from dmd2.sampling import ddim_sample, student_sample
    from dmd2.schedule import student_timesteps

    fam, unet = tr.family, tr.real_unet  # the teacher: the same network and cost as a full student
    cond = fam.condition(list(CAPTIONS[:batch])).to(tr.device)
    noise = torch.randn(fam.latent_shape(batch), generator=torch.Generator().manual_seed(0)).to(tr.device)
    autocast = tr.mixed_precision == "bf16"
    samplers = {
        "teacher_50step_cfg": (lambda: ddim_sample(fam, unet, cond, noise, steps=50, guidance=fam.default_guidance,
                                                   autocast=autocast), 1),
        "student_4step": (lambda: student_sample(fam, unet, cond, noise, student_timesteps(4), seed=0,
                                                 autocast=autocast), repeats),
        "student_1step": (lambda: student_sample(fam, unet, cond, noise, student_timesteps(1, first=399), seed=0,
                                                 autocast=autocast), repeats),
    }
    timed(lambda: fam.decode(student_sample(fam, unet, cond, noise, [999, 499], seed=0, autocast=autocast)))  # warm-up
    out = {}
    for name, (fn, reps) in samplers.items():
        secs = statistics.median(timed(lambda: fam.decode(fn())) for _ in range(reps))
        out[f"{name}_images_per_s"] = batch / secs
    for name in ("student_4step", "student_1step"):
        out[f"{name}_speedup_vs_teacher"] = out[f"{name}_images_per_s"] / out["teacher_50step_cfg_images_per_s"]
    return out


def run_mode(mode: str, overrides: list[str], repeats: int, sample_repeats: int | None) -> dict:
    cfg = load_config(ROOT / MODES[mode], overrides)
    row = {"preset": MODES[mode], "lora_rank": cfg.lora_rank, "gradient_checkpointing": cfg.gradient_checkpointing,
           "frozen_dtype": cfg.frozen_dtype, "ok": False, "error": None}
    tr = None
    try:
        tr = DMD2Trainer(cfg)
        if torch.cuda.is_available():
            row["weights_gib"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        row.update(step_overhead(tr, repeats))
        row.update(peak_memory())
        if sample_repeats:
            row["sampling"] = sampling_throughput(tr, cfg.batch_size, sample_repeats)
        row["ok"] = True
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = f"out of memory: {str(e).splitlines()[0]}"
        row.update(peak_memory())
    finally:
        del tr
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a scaled-down SDXL at 64 px on CPU (what the test runs)")
    p.add_argument("--repeats", type=int, help="timed rounds per mode after one warm-up (default 3; --tiny 1)")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=list(MODES))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--workdir", help="where the pipeline folder and latent cache go (default: a temporary folder)")
    a = p.parse_args(argv)
    if not a.tiny and not torch.cuda.is_available():
        p.error("no CUDA GPU: run with --tiny on CPU")
    repeats = a.repeats or (1 if a.tiny else 3)
    resolution = 64 if a.tiny else 1024
    start = time.time()
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        unet_config = tiny_unet_config() if a.tiny else json.loads((ROOT / "configs/real_unets/sdxl-base.json").read_text())
        build_pipeline(tmp / "sdxl", unet_config, "cpu" if a.tiny else "cuda")
        built = time.time() - start
        overrides = [f"teacher={tmp / 'sdxl'}", f"data={caption_folder(tmp / 'data', resolution)}",
                     f"latent_cache_dir={tmp / 'cache'}", f"resolution={resolution}", "batch_size=2",
                     "sample_every=0", "eval_every=0", "checkpoint_every=0"]
        # --tiny on a CPU without bf16 units: fp32 (emulated bf16 is many times slower; the code path is the same)
        precision = "bf16" if not a.tiny or bf16_is_native("cpu") else "fp32"
        if precision == "fp32":
            overrides += ["mixed_precision=no", "frozen_dtype=fp32"]
        torch.manual_seed(0)
        modes = {m: run_mode(m, overrides, repeats, (1 if a.tiny else 3) if i == 0 else None)
                 for i, m in enumerate(a.modes)}
    sampling = next((r.pop("sampling") for r in modes.values() if "sampling" in r), None)
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "tiny": a.tiny, "precision": precision, "resolution": resolution, "batch_size": 2, "repeats": repeats,
        "unet_params": unet_params(unet_config),
        "unet": "configs/real_unets/sdxl-base.json, random weights" if not a.tiny else "sdxl-base config scaled down",
        "text_encoders": "1-layer random CLIP encoders of the real widths (768; 1280, projection 1280), 77 tokens",
        "vae": "real SDXL AutoencoderKL config, random weights",
        "modes": modes, "sampling": sampling, "build_seconds": built, "seconds": time.time() - start,
    }
    print_table(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


def print_table(r: dict) -> None:
    print(f"SDXL benchmark on {r['device']}, torch {r['torch']}: UNet {r['unet_params'] / 1e9:.3f}B parameters "
          f"({r['unet']}), {r['resolution']} px, batch {r['batch_size']}, median of {r['repeats']} rounds\n")
    mem = "peak GPU GiB (allocated / reserved)" if torch.cuda.is_available() else "peak RSS GiB (process, cumulative)"
    print(f"| mode | critic step | its passes' sum | ratio | generator step | ratio | {mem} |")
    print("|---|---|---|---|---|---|---|")
    for name, m in r["modes"].items():
        peak = (f"{m['peak_allocated_gib']:.1f} / {m['peak_reserved_gib']:.1f}" if "peak_allocated_gib" in m
                else f"{m.get('peak_rss_gib', math.nan):.1f}")
        if not m["ok"]:
            print(f"| {name} | {m['error']} | | | | | {peak} |")
            continue
        print(f"| {name} | {m['critic_step_ms']:.0f} ms | {m['critic_step_ms'] / m['critic_step_ratio']:.0f} ms | "
              f"{m['critic_step_ratio']:.2f}x | {m['generator_step_ms']:.0f} ms | {m['generator_step_ratio']:.2f}x | "
              f"{peak} |")
    print("(ratio: step time / the sum of its network passes timed alone; target <= 1.2x)")
    s = r["sampling"]
    if s:
        print("\n| sampler | images/s | vs teacher |\n|---|---|---|")
        print(f"| teacher 50-step DDIM + CFG | {s['teacher_50step_cfg_images_per_s']:.3f} | 1.0x |")
        for k, label in (("student_4step", "student 4-step"), ("student_1step", "student 1-step")):
            print(f"| {label} | {s[f'{k}_images_per_s']:.3f} | {s[f'{k}_speedup_vs_teacher']:.1f}x |")
    print(f"\ntotal {r['seconds']:.0f} s (pipeline folder built in {r['build_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
