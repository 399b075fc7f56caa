"""Distillation config: one dataclass, YAML presets, `--set key=value` overrides, validation up front."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dmd2.families import FAMILIES
from dmd2.guidance import SAMPLINGS
from dmd2.sampling import RENOISE

DIVERGENCES = ("reverse-kl", "forward-kl", "js")   # dm_divergence's values (training.losses.divergence_weights)
SID_ALPHA = 1.2                                     # SiD's alpha in its paper: sid_alpha's default
DM_LOSSES = ("dmd", "sid")                          # dm_loss's values (training.losses.distribution_matching_loss,
                                                    # training.losses.score_identity_loss)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"   # the presets
UNET_FAMILIES = ("pixel", "sdxl", "sd15")  # guidance-conditioned students and the per-step critic need a UNet


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key and the problem."""


@dataclass
class DistillConfig:
    """Every knob of a DMD2 run. Defaults are the embedded MNIST 1-step preset."""

    # models and data
    family: str = "pixel"                      # pixel (class labels), sdxl, sd15, sd3 or flux (text prompts)
    teacher: str = "assets/mnist/teacher"      # teacher: diffusers folder (pixel, sd*) or Hub repo id (sd*)
    data: str = "mnist5k"                      # real images. pixel: 'mnist5k' or a class-per-folder path;
                                               # sd*: a folder with metadata.jsonl (file_name, text) or 'hf:<dataset>'
    prompts: str | None = None                 # sd*: generator prompts, .txt (one a line) or .parquet; None: the captions
    resolution: int | None = None              # sd*: image size to train at (None: the teacher's, e.g. 1024 for SDXL)
    latent_cache_dir: str = "~/.cache/dmd2/latents"  # sd*: VAE latents of the real images, computed once
    frozen_dtype: str = "fp32"                 # teacher, text encoders, VAE (and a LoRA's base): "fp32" or "bf16"
    # the generator's parameterisation
    lora_rank: int = 0                         # sd*: > 0 trains a LoRA of this rank instead of the full UNet
    lora_alpha: float = 8.0                    # LoRA scale alpha / rank (official SDXL: rank 64, alpha 8)
    lora_target_modules: list | None = None    # module-name suffixes; None: the family's (DMD2's list)
    gradient_checkpointing: bool = False       # recompute activations of the generator and fake score
    compile: bool = False                      # torch.compile (inductor) the generator, fake score and teacher
                                               # forwards; first steps are slow (compiling); not with FSDP
    channels_last: bool = False                # channels_last memory format for those networks' weights (and so
                                               # their activations); not with FSDP
    generator_init: str | None = None          # a student folder of the same network to start the generator from
                                               # (e.g. a 1-step student for a 4-step run); None: the teacher
    generator_layers_per_block: int | None = None  # pixel: a deeper generator than the teacher (training/deepen.py),
                                               # still the teacher at the start; None: the teacher's network
    critic_layers_per_block: int | None = None  # pixel: the same for the fake score (the critic)
    # the student
    student_steps: int = 1                     # 1 -> [999]; 4 -> [999, 749, 499, 249]
    first_timestep: int | None = None          # 1-step only: condition on this t (SDXL official: 399)
    student_timesteps: list | None = None      # the student's timesteps, noisiest first, one per step (e.g. a
                                               # 2-step student at [999, 749]; several steps start at 999, where
                                               # the first takes pure noise); None: evenly spaced from 999
    flow_shift: float | None = None            # flow teachers: the timestep shift s = shift u / (1 + (shift-1) u)
                                               # that maps student timesteps, DMD noise levels and the GAN's to
                                               # sigmas; None: the teacher's (its scheduler_config.json); recorded
                                               # in dmd2.json
    backward_simulation: bool = True           # multi-step inputs from the student's own trajectory
    renoise: str = "fresh"                     # multi-step: how the student moves between its steps, in backward
                                               # simulation and (recorded in dmd2.json) when it samples: "fresh"
                                               # (re-noise the x0 estimate with fresh noise, DMD2) or "ddim" (DDIM's
                                               # move, keeping the noise the state implies)
    step_weights: list | None = None           # multi-step: how often each step k is trained (relative weights);
                                               # None: uniform, as DMD2
    critic_per_step: bool = False              # multi-step: the fake score and GAN head also see which student
                                               # step made a sample (a zero-initialised step embedding), so they
                                               # model each step's outputs, not their mixture; False: as DMD2
    # distribution matching (real score vs fake score)
    dm_weight: float = 1.0                     # 0 switches distribution matching off ("GAN only")
    real_guidance: float = 1.0                 # CFG scale of the real score (teacher); with guidance_range, the
                                               # student's default w (sample grids, quick evaluation, the app)
    guidance_range: list | None = None         # [w_min, w_max]: a guidance-conditioned student. Each generator
                                               # sample draws its own w there; the real score uses CFG at that w,
                                               # and the generator and the fake score take w as an input (a zero-
                                               # initialised guidance embedding); null: the fixed real_guidance
    real_guidance_above: list | None = None    # [t, w]: the real score's CFG scale is w at DM noise levels >= t
                                               # (real_guidance below): a target broadened or sharpened where the
                                               # layout is decided only; null: real_guidance at every t
    guidance_sampling: str = "uniform"         # how w is drawn: "uniform" or "log_uniform" (uniform in log w)
    guidance_embed_dim: int = 256              # width of the w embedding (diffusers' time_cond_proj_dim)
    dm_min_t: float = 0.02                     # t ~ U[dm_min_t * T, dm_max_t * T]
    dm_max_t: float = 0.98
    dm_divergence: str = "reverse-kl"          # which f-divergence the DM gradient follows: "reverse-kl" (DMD,
                                               # DMD2), or the less mode-seeking "forward-kl" / "js" (f-distill):
                                               # each sample's gradient weighted by h(p/q), the density ratio
                                               # read from the GAN head at the DM noise level (needs the GAN on)
    dm_loss: str = "dmd"                       # the generator's DM objective: "dmd" (DMD, DMD2: the score difference
                                               # as a gradient, no backward through the scores) or "sid" (score
                                               # identity distillation, Zhou et al. 2024: a Fisher-divergence loss
                                               # whose gradient also flows through the teacher and the fake score)
    sid_alpha: float = SID_ALPHA               # dm_loss sid: the weight alpha of SiD's loss (1.2 in its paper; it
                                               # tried 1 and 1.2); >= 0, no upper bound checked
    # GAN on the fake score's bottleneck
    gan_generator_weight: float = 3e-3         # 0 with gan_critic_weight 0 switches the GAN off
    gan_critic_weight: float = 1e-2
    gan_max_t: int = 1000                      # real and fake are noised at t ~ U[0, gan_max_t)
    gan_head: str = "small"                    # "small": conv-conv-conv + spatial mean (the MNIST students);
                                               # "official": DMD2's strided 4x4 convs down to 1x1, GroupNorm 32
    # DMD's regression term (DMD1; DMD2 drops it): mse(G(z), teacher's DDIM sample from z) on stored pairs
    regression_weight: float = 0.0             # 0 = off (DMD2); > 0 needs regression_pairs (pixel, 1-step only)
    regression_pairs: str | None = None        # .npz from `python -m training pairs` at this real_guidance
    # two time-scale update rule and optimisation
    ttur: int = 5                              # critic updates per generator update
    iterations: int = 2000                     # critic updates; the generator updates every `ttur`-th
    batch_size: int = 64
    generator_lr: float = 2e-5
    critic_lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 500                    # linear LR warm-up length, in units of warmup_unit
    warmup_unit: str = "optimizer_steps"       # "optimizer_steps": each model's own updates (500 = 500 critic
                                               # updates and 500 generator updates = 500 * ttur iterations);
                                               # "iterations": critic updates, the same span for both models
                                               # (the official trainer's 500 scheduler steps, counted once per
                                               # process per iteration on 64 GPUs, are ~8 iterations)
    lr_schedule: str = "constant"              # after warm-up: "constant" or "cosine" (down to lr_min_ratio)
    lr_min_ratio: float = 0.1                  # cosine: final LR as a fraction of the base LR
    grad_clip: float = 10.0
    mixed_precision: str = "bf16"              # "bf16" autocast, "no" (fp32), or "auto": bf16 where the hardware
                                               # has it (dmd2.sampling.bf16_is_native), else fp32
    ema_decay: float = 0.99                    # EMA of the generator (0 = off), per generator update
    seed: int = 0
    # bookkeeping
    log_every: int = 10                        # steps between metrics.jsonl lines
    sample_every: int = 200                    # steps between sample grids
    eval_every: int = 500                      # steps between quick FID/alignment evaluations (0 = off)
    eval_num: int = 500                        # samples in a quick evaluation
    checkpoint_every: int = 250                # steps between checkpoints
    keep_checkpoints: int = 2                  # older checkpoints are deleted
    checkpoint_format: str = "full"            # "full": rank 0 writes the gathered state.pt; "sharded": every rank
                                               # writes its own DCP shards (torch.distributed.checkpoint), no gather
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.yaml

    @property
    def use_gan(self) -> bool:
        return self.gan_generator_weight > 0 or self.gan_critic_weight > 0

    def validate(self) -> "DistillConfig":
        """Raise ConfigError naming the first bad value."""
        def need(ok, key, why):
            if not ok:
                raise ConfigError(f"config {key}={getattr(self, key)!r}: {why}")

        need(self.family in FAMILIES, "family", f"must be one of {', '.join(FAMILIES)}")
        text = self.family != "pixel"
        need(text or self.prompts is None, "prompts", "only for the text families (sdxl, sd15, sd3, flux); pixel uses class labels")
        need(self.prompts is None or Path(str(self.prompts)).suffix.lower() in (".txt", ".parquet"), "prompts",
             "must be a .txt file (one prompt a line) or a .parquet file (a prompt/text/caption column)")
        need(not text or self.data != "mnist5k", "data",
             f"family {self.family} needs images with captions: a folder with metadata.jsonl or 'hf:<dataset>'")
        need(self.resolution is None or (isinstance(self.resolution, int) and not isinstance(self.resolution, bool)
                                         and self.resolution >= 8), "resolution", "must be an integer >= 8 or null")
        need(self.frozen_dtype in ("fp32", "bf16"), "frozen_dtype", "must be 'fp32' or 'bf16'")
        need(self.frozen_dtype == "fp32" or self.mixed_precision == "bf16", "frozen_dtype",
             "bf16 frozen parts need mixed_precision: bf16")
        need(isinstance(self.lora_rank, int) and self.lora_rank >= 0, "lora_rank", "must be an integer >= 0")
        need(self.lora_rank == 0 or text, "lora_rank", "LoRA generators are for the text families (sdxl, sd15, sd3, flux)")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(self.lora_target_modules is None or (isinstance(self.lora_target_modules, list) and self.lora_target_modules
                                                  and all(isinstance(m, str) and m for m in self.lora_target_modules)),
             "lora_target_modules", "must be null or a non-empty list of module names")
        need(not text or self.eval_every == 0, "eval_every",
             "the quick evaluation scores MNIST digits; set eval_every: 0 for the text families")
        need(isinstance(self.compile, bool), "compile", "must be true or false")
        need(isinstance(self.channels_last, bool), "channels_last", "must be true or false")
        need(self.generator_init is None or self.lora_rank == 0, "generator_init",
             "a LoRA generator starts from the teacher; drop generator_init or set lora_rank: 0")
        for key in ("generator_layers_per_block", "critic_layers_per_block"):
            depth = getattr(self, key)
            need(depth is None or (isinstance(depth, int) and not isinstance(depth, bool) and 1 <= depth <= 8),
                 key, "must be null or an integer in 1..8")
            need(depth is None or self.family == "pixel", key,
                 f"deepening is for the pixel family's UNet2DModel; set {key}: null")
            need(depth is None or self.guidance_range is None, key,
                 "not with guidance_range (a guidance-conditioned network is not deepened); set one of them to null")
        need(isinstance(self.student_steps, int) and 1 <= self.student_steps <= 1000, "student_steps", "must be an integer in 1..1000")
        need(self.flow_shift is None or (isinstance(self.flow_shift, (int, float)) and not isinstance(self.flow_shift, bool)
                                         and math.isfinite(self.flow_shift) and self.flow_shift > 0),
             "flow_shift", "must be null or a positive number")
        need(self.first_timestep is None or (self.student_steps == 1 and 0 <= self.first_timestep < 1000),
             "first_timestep", "only for 1-step students, in 0..999")
        ts = self.student_timesteps
        need(ts is None or (isinstance(ts, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ts)),
             "student_timesteps", "must be null or a list of integers, one per student step (e.g. [999, 749])")
        need(ts is None or len(ts) > 0, "student_timesteps", "must name at least one timestep (or be null)")
        need(ts is None or all(0 <= t < 1000 for t in ts), "student_timesteps", "each must be in 0..999")
        need(ts is None or len(ts) == 1 or ts[0] == 999, "student_timesteps",
             "a multi-step student's first step starts from pure noise, so it must be at t = 999 (a 1-step student "
             "may name another t, as first_timestep does)")
        need(ts is None or all(a > b for a, b in zip(ts, ts[1:])), "student_timesteps",
             "must be strictly decreasing (noisiest first, as the student samples)")
        need(ts is None or len(ts) == self.student_steps, "student_timesteps",
             f"gives {len(ts or [])} timesteps for a {self.student_steps}-step student; give one per step "
             f"(or set student_steps: {len(ts or [])})")
        need(ts is None or self.first_timestep is None, "student_timesteps",
             "and first_timestep both set the timesteps; keep one of them")
        need(self.step_weights is None or (
                isinstance(self.step_weights, list) and len(self.step_weights) == self.student_steps
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in self.step_weights)
                and sum(self.step_weights) > 0),
             "step_weights", f"must be null or {self.student_steps} numbers >= 0 (one per student step), not all 0")
        need(isinstance(self.critic_per_step, bool), "critic_per_step", "must be true or false")
        need(self.renoise in RENOISE, "renoise", f"must be one of {', '.join(RENOISE)}")
        need(self.renoise == "fresh" or self.student_steps > 1, "renoise", "sets how a multi-step student moves "
             "between its steps; a 1-step student has none: set renoise: fresh (or leave it out)")
        need(self.renoise == "fresh" or self.backward_simulation, "renoise", "sets how backward simulation moves "
             "between steps, which backward_simulation: false replaces by noised real images: set "
             "backward_simulation: true, or renoise: fresh")
        need(self.renoise == "fresh" or self.family == "pixel", "renoise", "ddim is built for pixel students; a "
             "text student's plain-diffusers recipe (its model card: LCMScheduler) re-noises with fresh noise, so "
             "it would not sample as trained: set renoise: fresh")
        need(not self.critic_per_step or self.student_steps > 1, "critic_per_step",
             "is for multi-step students (student_steps > 1): a 1-step student has one output distribution")
        # Both hook into diffusers' UNet time embedding, which the transformer families (sd3, flux) do not have.
        need(not self.critic_per_step or self.family in UNET_FAMILIES, "critic_per_step",
             f"family {self.family} has no UNet time embedding to add a step embedding to "
             f"({', '.join(UNET_FAMILIES)} have); set critic_per_step: false")
        need(self.guidance_range is None or self.family in UNET_FAMILIES, "guidance_range",
             f"family {self.family} has no guidance-conditioned networks ({', '.join(UNET_FAMILIES)} have); "
             f"set guidance_range: null")
        need(self.dm_weight >= 0, "dm_weight", "must be >= 0")
        need(self.real_guidance >= 0, "real_guidance", "must be >= 0")
        need(self.guidance_range is None or (
                isinstance(self.guidance_range, list) and len(self.guidance_range) == 2
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.guidance_range)
                and 0 <= self.guidance_range[0] < self.guidance_range[1]),
             "guidance_range", "must be null or [w_min, w_max] with 0 <= w_min < w_max")
        need(self.guidance_sampling in SAMPLINGS, "guidance_sampling", f"must be one of {', '.join(SAMPLINGS)}")
        if self.guidance_range is not None:
            low, high = self.guidance_range
            need(self.guidance_sampling != "log_uniform" or low > 0, "guidance_sampling",
                 "log_uniform needs guidance_range[0] > 0")
            need(low <= self.real_guidance <= high, "real_guidance",
                 f"with guidance_range it is the student's default w, so it must lie in [{low:g}, {high:g}]")
            need(self.lora_rank == 0, "guidance_range", "a LoRA generator keeps the teacher's UNet, which has no "
                 "guidance input: train the full UNet (lora_rank: 0) for a guidance-conditioned student")
            need(isinstance(self.guidance_embed_dim, int) and 2 <= self.guidance_embed_dim <= 4096,
                 "guidance_embed_dim", "must be an integer in 2..4096")
        need(0 <= self.dm_min_t < self.dm_max_t <= 1, "dm_min_t", "need 0 <= dm_min_t < dm_max_t <= 1")
        if self.real_guidance_above is not None:
            pair = self.real_guidance_above
            need(isinstance(pair, list) and len(pair) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
                 and float(pair[0]).is_integer() and 1 <= pair[0] <= 999 and pair[1] >= 0,
                 "real_guidance_above", f"must be null or [t, w] with t an integer timestep in 1..999 and w >= 0, "
                 f"got {pair!r}")
            need(self.guidance_range is None, "real_guidance_above", "a guidance-conditioned student (guidance_range) "
                 "draws the real score's w per sample; set real_guidance_above: null")
            need(self.dm_weight > 0, "real_guidance_above", "sets the real score of the DM term, which dm_weight 0 "
                 "switches off")
            need(self.family != "flux", "real_guidance_above", "FLUX takes its guidance as a network input, where "
                 "a scale of 1 means its distilled default, not one CFG pass: not supported there")
            need(self.regression_weight == 0, "real_guidance_above", "the regression pairs are the teacher's "
                 "samples at real_guidance alone, so they would pull toward another target than the DM term's: "
                 "set regression_weight: 0")
        need(self.gan_generator_weight >= 0, "gan_generator_weight", "must be >= 0")
        need(self.gan_critic_weight >= 0, "gan_critic_weight", "must be >= 0")
        need(1 <= self.gan_max_t <= 1000, "gan_max_t", "must be in 1..1000")
        need(self.gan_head in ("small", "official"), "gan_head", "must be 'small' or 'official'")
        need(self.dm_loss in DM_LOSSES, "dm_loss", f"must be one of {', '.join(DM_LOSSES)}")
        if self.dm_loss == "sid":
            need(self.dm_weight > 0, "dm_loss", "sets the distribution-matching objective, which dm_weight 0 switches "
                 "off: set dm_weight > 0, or dm_loss: dmd")
            need(self.dm_divergence == "reverse-kl", "dm_loss", f"sid is its own divergence (Fisher's), it does not "
                 f"take dm_divergence={self.dm_divergence!r}'s weights: set dm_divergence: reverse-kl or dm_loss: dmd")
        need(isinstance(self.sid_alpha, (int, float)) and not isinstance(self.sid_alpha, bool)
             and math.isfinite(self.sid_alpha) and self.sid_alpha >= 0, "sid_alpha", "must be a number >= 0")
        need(self.dm_loss == "sid" or self.sid_alpha == SID_ALPHA, "sid_alpha", "weighs SiD's loss, which this config "
             "does not use: set dm_loss: sid, or leave sid_alpha out")
        need(self.dm_divergence in DIVERGENCES, "dm_divergence", f"must be one of {', '.join(DIVERGENCES)}")
        if self.dm_divergence != "reverse-kl":
            need(self.dm_weight > 0, "dm_divergence", "weights the distribution-matching gradient, which "
                 "dm_weight 0 switches off")
            need(self.gan_critic_weight > 0, "dm_divergence", "reads the density ratio from the GAN head, which "
                 "only a trained discriminator gives: set gan_critic_weight > 0, or dm_divergence: reverse-kl")
            need(self.batch_size >= 2, "dm_divergence", "weighs each sample against the rest of its batch: "
                 "batch_size must be at least 2")
            # for T = 1000; the trainer asks again with the teacher's own T
            uncovered = gan_misses_dm_noise(self, 1000)
            need(uncovered is None, "dm_divergence", uncovered)
        need(isinstance(self.regression_weight, (int, float)) and not isinstance(self.regression_weight, bool)
             and math.isfinite(self.regression_weight) and self.regression_weight >= 0, "regression_weight",
             "must be a number >= 0")
        if self.regression_weight > 0:
            need(isinstance(self.regression_pairs, str) and self.regression_pairs, "regression_pairs",
                 "regression_weight > 0 needs a pairs file: make one with `python -m training pairs --out F.npz`")
            need(self.family == "pixel", "regression_weight", "the regression term is for class-conditional pixel "
                 "teachers (pairs are made by `python -m training pairs`); set regression_weight: 0")
            need(self.student_steps == 1, "regression_weight", "the regression term is for 1-step students (their "
                 "one step maps the pairs' noise to the teacher's sample); set regression_weight: 0")
            need(self.guidance_range is None, "regression_weight", "pairs are made at one guidance scale, a "
                 "guidance-conditioned student takes many; set regression_weight: 0 or guidance_range: null")
        need(self.dm_weight > 0 or self.gan_generator_weight > 0 or self.regression_weight > 0, "dm_weight",
             "with dm_weight 0 the GAN generator weight (or regression_weight) must be > 0, or the generator "
             "learns nothing")
        need(isinstance(self.ttur, int) and self.ttur >= 1, "ttur", "must be an integer >= 1")
        need(isinstance(self.iterations, int) and self.iterations >= 1, "iterations", "must be an integer >= 1")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1")
        need(self.generator_lr > 0, "generator_lr", "must be > 0")
        need(self.critic_lr > 0, "critic_lr", "must be > 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(self.warmup_unit in ("optimizer_steps", "iterations"), "warmup_unit",
             "must be 'optimizer_steps' or 'iterations'")
        need(self.lr_schedule in ("constant", "cosine"), "lr_schedule", "must be 'constant' or 'cosine'")
        need(0 <= self.lr_min_ratio <= 1, "lr_min_ratio", "must be in [0, 1]")
        need(self.grad_clip > 0, "grad_clip", "must be > 0")
        need(self.mixed_precision in ("bf16", "no", "auto"), "mixed_precision", "must be 'bf16', 'no' or 'auto'")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        for key in ("log_every", "sample_every", "eval_every", "checkpoint_every", "eval_num"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 0, key, "must be an integer >= 0")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.checkpoint_format in ("full", "sharded"), "checkpoint_format", "must be 'full' or 'sharded'")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def gan_misses_dm_noise(cfg: DistillConfig, T: int, teacher: str = "") -> str | None:
    """Why a non-reverse-KL `dm_divergence` cannot read the GAN head at the DM's noise levels (the head is trained
    at t < gan_max_t; the DM draws t up to dm_max_t * T, at most T - 1), or None when it can."""
    top = min(int(cfg.dm_max_t * T), T - 1)
    if cfg.gan_max_t > top:
        return None
    return (f"reads the GAN head at the DM's noise levels up to t = {top}{teacher}, but it is trained only below "
            f"gan_max_t = {cfg.gan_max_t}: raise gan_max_t or lower dm_max_t")


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}


def _coerce(key: str, value):
    """Type-check a value against the field's default type (YAML already parsed it)."""
    if key not in FIELDS:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(FIELDS)}")
    default = FIELDS[key].default if FIELDS[key].default is not dataclasses.MISSING else None
    if key == "betas":
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ConfigError(f"config betas={value!r}: must be a list of two numbers")
        return tuple(float(v) for v in value)
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config {key}={value!r}: must be true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {key}={value!r}: must be an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {key}={value!r}: must be a number")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        hint = " (YAML reads yes/no/on/off as true/false: quote it, e.g. 'no')" if isinstance(value, bool) else ""
        raise ConfigError(f"config {key}={value!r}: must be a string{hint}")
    return value


# Keys renamed since a run folder's config.yaml may have been written: old name -> new name.
RENAMED = {"steps": "iterations"}


def _renamed(values: dict, where: str, stacklevel: int = 3) -> dict:
    """`values` with old key names replaced by the new ones (a FutureWarning for each, pointing `stacklevel`
    frames up: at load_config's caller); both is an error."""
    out = dict(values)
    for old, new in RENAMED.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{where} sets both {old!r} and {new!r}: {old!r} is the old name of {new!r}, keep one")
        warnings.warn(f"{where}: config key {old!r} is deprecated, call it {new!r}", FutureWarning, stacklevel=stacklevel)
        out[new] = out.pop(old)
    return out


BASE_KEY = "base"   # a preset may start from another: `base: mnist-1step.yaml` (relative to its own folder)


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file's values with its `base:` chain applied (the base's values first, the file's own over
    them), old key names renamed. Every problem (missing file, bad YAML, a loop of bases) is a ConfigError
    naming the file."""
    path = Path(path)
    named_by = f" (named as the base of {_chain[-1]})" if _chain else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{named_by}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}{named_by} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}{named_by} must hold a mapping of keys to values")
    if path.resolve() in _chain:
        loop = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"config file {path}: its bases form a loop: {loop}")
    values: dict = {}
    base = loaded.pop(BASE_KEY, None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"config file {path}: {BASE_KEY}={base!r} must name another config file")
        values = read_config_file(path.parent / base, (*_chain, path.resolve()))
    # the warning points at load_config's caller: past _renamed, this frame and its bases' frames, load_config
    values.update(_renamed(loaded, f"config file {path}", stacklevel=4 + len(_chain)))
    return values


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> DistillConfig:
    """Defaults <- YAML file (after its `base:` chain) <- `key=value` overrides (values parsed as YAML), then
    validated."""
    values: dict = read_config_file(path) if path is not None else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = next(iter(_renamed({key.strip(): None}, f"override {item!r}")))
        default = FIELDS[key].default if key in FIELDS else None
        if isinstance(default, str) and raw.strip().lower() in ("yes", "no", "on", "off", "true", "false"):
            values[key] = raw.strip()  # a string field: `--set mixed_precision=no` means the word, not false
            continue
        try:
            values[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
    return DistillConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def config_text(cfg: DistillConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: DistillConfig, path: str | Path) -> None:
    Path(path).write_text(config_text(cfg))


# --- presets and `--set` values, as the app offers and writes them -----------------------------

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def preset_family(path: str | Path) -> str | None:
    """The family a preset file trains (pixel when it names none); None if it is not a distillation preset."""
    try:
        return read_config_file(path).get("family", "pixel")
    except ConfigError:                   # e.g. a broken base: listed, so the Train tab can say what is wrong
        try:
            own = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            return None
        return own.get("family", "pixel") if isinstance(own, dict) else None
    except OSError:
        return None


DEFAULT_PRESET = "mnist-1step"   # listed first (the app's default): the teacher-to-student recipe


def list_presets(configs: Path = CONFIGS, cuda: bool | None = None) -> list[str]:
    """Preset names (configs/<name>.yaml), DEFAULT_PRESET first; presets of GPU families (SDXL, SD1.5) only when
    CUDA is available."""
    cuda = cuda_available() if cuda is None else cuda
    names = []
    for path in sorted(Path(configs).glob("*.yaml")):
        family = preset_family(path)
        if family is not None and ((family == "pixel" and "sdxl" not in path.stem) or cuda):
            names.append(path.stem)
    return sorted(names, key=lambda name: name != DEFAULT_PRESET)   # stable: the rest stay alphabetical


def overrides_from(settings: dict | None = None, extra: str = "") -> list[str]:
    """`--set` values: `key=value` for each setting (None skipped), then the `extra` lines as typed.

    Values are written so the trainer's YAML parsing reads them back as given: booleans as
    true/false, strings quoted, whole floats for integer config keys as integers (a browser number
    box sends 4.0 for 4). Blank lines and lines starting with # in `extra` are ignored.
    """
    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"config values must be a mapping of key to value, got {type(settings).__name__}")
    if not isinstance(extra or "", str):
        raise ConfigError(f"other config values must be text (key=value lines), got {type(extra).__name__}")
    out = []
    for key, value in (settings or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be text, got {key!r}")
        if value is None:
            continue
        is_int_key = key in FIELDS and type(FIELDS[key].default) is int
        if is_int_key and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(value)
        out.append(f"{key}={text}")
    for line in (extra or "").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if "=" not in line:
                raise ConfigError(f"other config values: {line!r} must look like key=value")
            out.append(line)
    return out
