"""The DMD2 trainer: generator, real score and fake score (+ GAN head), their optimisers, and the two
per-step updates (`critic_step` every iteration, `generator_step` every `ttur`-th), with state for exact resume.

The loop around it (logging, samples, checkpoints, the run folder) is `training/distill.py`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from dmd2.families import PixelFamily, family_class
from dmd2.guidance import sample_guidance
from dmd2.sampling import bf16_is_native, renoise_seed, student_sample
from dmd2.schedule import FlowSchedule, student_timesteps
from training import losses
from training.config import ConfigError, DistillConfig, gan_misses_dm_noise
from training.critic import Critic
from training.deepen import deepen
from training.lora import add_lora
from training.pairs import load_pairs
from training.data import InfiniteSampler, load_dataset
from training.text_data import captioned_images, cached_latents, read_prompts
from training.runs import RunError
from training import sharding
from training.simulate import generator_input, randn


class NonFiniteLoss(FloatingPointError):
    """A loss became NaN or inf; the message names the step and the loss."""


def lr_factor(schedule: str, warmup_steps: float, horizon: int, min_ratio: float):
    """LR multiplier per optimiser step: linear warm-up, then constant or cosine down to `min_ratio`."""
    def factor(s: int) -> float:
        if warmup_steps > 0 and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant" or horizon <= warmup_steps:
            return 1.0
        progress = min(1.0, (s - warmup_steps) / (horizon - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def resolve_mixed_precision(setting: str, device) -> str:
    """The config's mixed_precision as run on `device`: "auto" becomes "bf16" where the hardware has bf16 and
    "no" (fp32) elsewhere; an explicit "bf16" on hardware that only emulates it is kept, with a warning."""
    native = bf16_is_native(device)
    if setting == "auto":
        return "bf16" if native else "no"
    if setting == "bf16" and not native:
        warnings.warn(f"mixed_precision: bf16 on a {torch.device(device).type} without bf16 units (no AVX512-BF16 "
                      f"or AMX): autocast is emulated and can be many times slower than fp32 (24.6 s vs 1.4 s a "
                      f"step of configs/mnist-1step.yaml on an AVX2 CPU); set mixed_precision: auto or no",
                      RuntimeWarning, stacklevel=3)
    return setting


class DMD2Trainer:
    """Models, optimisers and the two per-step updates of DMD2 (`critic_step`, `generator_step`)."""

    def __init__(self, cfg: DistillConfig, accelerator=None, teacher: torch.nn.Module | None = None,
                 data: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`teacher` / `data`: a pixel teacher UNet and (images, labels) already in memory (tests, scripts)."""
        from accelerate import Accelerator

        self.cfg = cfg
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.acc.device
        rank = self.acc.process_index
        self.mixed_precision = resolve_mixed_precision(cfg.mixed_precision, self.device)
        # FSDP asked for: the trainer shards the generator and the critic itself (training/sharding.py), on CPU
        # and GPU alike; then some calls (state dicts, sampling) must run on every rank.
        self.sharded = sharding.fsdp_requested(self.acc)
        if self.sharded and cfg.ema_decay > 0:
            raise ConfigError("ema_decay > 0 with FSDP: the EMA would be a full copy of the generator on every GPU; "
                              "set ema_decay: 0 (as the SDXL presets do) or use DDP")
        if self.sharded and (cfg.compile or cfg.channels_last):
            raise ConfigError("compile / channels_last with FSDP: not supported (the sharded parameters are DTensors "
                              "that neither was tested with); set compile: false and channels_last: false, or use DDP")
        if cfg.guidance_range is not None and cfg.lora_rank:  # also for a config that skipped validate()
            raise ConfigError("guidance_range with lora_rank > 0: a LoRA trains only adapters, so the generator's w "
                              "projection would stay zero and the student would ignore w; set lora_rank: 0")
        text = cfg.family != "pixel"
        # Paths first (relative ones from the working directory): a bad one fails before any model is loaded.
        if cfg.generator_init and not Path(cfg.generator_init).expanduser().is_dir():
            raise ConfigError(f"config generator_init={cfg.generator_init!r}: must be an existing student folder "
                              f"(e.g. assets/mnist/dmd2-1step) or null")
        images = captioned_images(cfg.data) if text else None
        self.prompts = read_prompts(cfg.prompts) if cfg.prompts else None

        frozen_dtype = torch.bfloat16 if cfg.frozen_dtype == "bf16" else torch.float32
        if teacher is None:
            self.family, teacher = family_class(cfg.family).for_training(
                cfg.teacher, device=self.device, frozen_dtype=frozen_dtype, resolution=cfg.resolution)
        elif cfg.family == "pixel":
            self.family = PixelFamily.from_unet(teacher)
        else:
            raise ConfigError(f"family {cfg.family}: pass the teacher as a config path, not a module")
        if cfg.flow_shift is not None:
            if not isinstance(self.family.schedule, FlowSchedule):
                raise ConfigError(f"config flow_shift={cfg.flow_shift}: the teacher {cfg.teacher} is not a flow model "
                                  f"(its schedule is {self.family.schedule.kind}); set flow_shift: null")
            self.family.schedule = FlowSchedule(cfg.flow_shift, self.family.schedule.num_train_timesteps)
        T = self.family.schedule.num_train_timesteps
        try:
            self.timesteps = student_timesteps(cfg.student_steps, T, first=cfg.first_timestep,
                                               chosen=cfg.student_timesteps)
        except ValueError as e:  # validate() checked 0..999; the teacher's T is known only here
            raise ConfigError(f"config student_timesteps={cfg.student_timesteps}: this teacher has timesteps "
                              f"0..{T - 1} ({e})") from None
        if cfg.real_guidance_above is not None:
            low, high = int(cfg.dm_min_t * T), min(int(cfg.dm_max_t * T), T - 1)   # the DM term's noise levels
            if not low < int(cfg.real_guidance_above[0]) <= high:
                raise ConfigError(f"config real_guidance_above={cfg.real_guidance_above}: its t must split the DM "
                                  f"term's noise levels {low}..{high} (dm_min_t, dm_max_t of this teacher's {T}), or "
                                  f"one scale covers them all: use real_guidance")
        uncovered = gan_misses_dm_noise(cfg, T, teacher=f" of this teacher's {T}")
        if cfg.dm_divergence != "reverse-kl" and uncovered:
            raise ConfigError(f"config dm_divergence={cfg.dm_divergence!r} {uncovered}")
        # self.images / self.labels: pixel images and class labels, or VAE latents and captions.
        if text:
            with self.acc.main_process_first():  # rank 0 encodes (or checks) the cache, the others then read it
                self.images, self.labels = cached_latents(self.family, images, self.family.height,
                                                          cfg.latent_cache_dir, log=self.acc.print)
            self.prompts = self.prompts or list(self.labels)  # no prompt file: the generator uses the captions
        else:
            images, labels = load_dataset(cfg.data, self.family.image_size, self.family.channels) if data is None else data
            if int(labels.max()) >= self.family.num_classes:
                raise ConfigError(f"data {cfg.data!r} has label {int(labels.max())}, the teacher knows "
                                  f"{self.family.num_classes} classes")
            self.images, self.labels = images, labels

        # DMD's regression term: stored (noise, label, teacher sample) pairs of this teacher at this guidance,
        # drawn by their own sampler (below); validate() keeps it to 1-step, unguided, pixel students.
        self.pairs = None
        if cfg.regression_weight > 0:
            if cfg.student_steps != 1 or cfg.guidance_range is not None:  # also for a config that skipped validate()
                raise ConfigError("regression_weight > 0 is for 1-step students without guidance_range")
            self.pairs = load_pairs(cfg.regression_pairs, self.family, teacher=teacher,
                                    guidance=cfg.real_guidance).to(self.device)

        torch.manual_seed(cfg.seed)  # the GAN head's initialisation
        self.real_unet = teacher.to(self.device).eval().requires_grad_(False)
        # A guidance-conditioned student (guidance_range): the generator and the fake score take w as an input.
        self.guided = cfg.guidance_range is not None
        guidance_dim = cfg.guidance_embed_dim if self.guided else 0
        # More capacity than the teacher (generator_layers_per_block, critic_layers_per_block): still the teacher
        # at the start (training/deepen.py).
        for key in ("generator_layers_per_block", "critic_layers_per_block"):
            if getattr(cfg, key) is not None and (cfg.family != "pixel" or self.guided):  # skipped validate()
                raise ConfigError(f"{key} is for unguided pixel students")

        def deeper(network, key):
            try:
                return deepen(network, getattr(cfg, key), seed=cfg.seed)
            except ValueError as e:
                raise ConfigError(f"config {key}={getattr(cfg, key)}: {e}") from None

        if self.guided:
            generator = self.family.guidance_conditioned(self.real_unet, guidance_dim)
        elif cfg.generator_layers_per_block is not None:
            generator = deeper(self.real_unet, "generator_layers_per_block")
        else:
            generator = copy.deepcopy(self.real_unet)
        generator.train().requires_grad_(True)
        if cfg.generator_init:
            init_generator(generator, self.family.load_student(cfg.generator_init), cfg.generator_init)
        fake = None if cfg.critic_layers_per_block is None else deeper(self.real_unet, "critic_layers_per_block")
        critic = Critic(self.family, self.real_unet, use_gan=cfg.use_gan,
                        num_steps=cfg.student_steps if cfg.critic_per_step else 0, head=cfg.gan_head,
                        guidance_dim=guidance_dim, fake=fake).to(self.device)
        if cfg.lora_rank:
            add_lora(generator, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules or self.family.lora_target_modules,
                     base_dtype=frozen_dtype)
        if cfg.gradient_checkpointing:
            generator.enable_gradient_checkpointing()
            critic.fake_unet.enable_gradient_checkpointing()
            if cfg.dm_loss == "sid":   # SiD backpropagates through the teacher too (its CFG pass doubles the batch)
                self.real_unet.enable_gradient_checkpointing()
        if frozen_dtype != torch.float32:  # after the copies above, which train in fp32
            self.real_unet.to(frozen_dtype)
        self.ema = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        for network in (generator, critic.fake_unet, self.real_unet):  # after the EMA's copy, which stays plain
            speed_up(network, compile=cfg.compile, channels_last=cfg.channels_last)

        if self.sharded:  # before the optimisers, which then hold the sharded (DTensor) parameters
            self.shard_units = {"generator": sharding.shard(generator, self.device),
                                "critic": sharding.shard(critic, self.device)}
        adamw = dict(betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        trainable = [p for p in generator.parameters() if p.requires_grad]  # all of them, or only the LoRA's
        opt_g = torch.optim.AdamW(trainable, lr=cfg.generator_lr, **adamw)
        opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, **adamw)
        if self.sharded:
            self.generator, self.critic, self.opt_g, self.opt_c = generator, critic, opt_g, opt_c
        else:
            self.generator, self.critic, self.opt_g, self.opt_c = self.acc.prepare(generator, critic, opt_g, opt_c)
        # Horizons in each optimiser's own steps: the generator steps once per `ttur` critic steps; a warm-up
        # counted in iterations is `ttur` times shorter in generator updates.
        warmup_g = cfg.warmup_steps / cfg.ttur if cfg.warmup_unit == "iterations" else cfg.warmup_steps
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(
            self.opt_g, lr_factor(cfg.lr_schedule, warmup_g, cfg.iterations // cfg.ttur, cfg.lr_min_ratio))
        self.sched_c = torch.optim.lr_scheduler.LambdaLR(
            self.opt_c, lr_factor(cfg.lr_schedule, cfg.warmup_steps, cfg.iterations, cfg.lr_min_ratio))

        # Every random draw of training goes through these, so a checkpoint can restore them exactly.
        self.rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        self.sampler = InfiniteSampler(len(self.images), cfg.batch_size, seed=cfg.seed * 1000 + rank)
        self.prompt_sampler = (InfiniteSampler(len(self.prompts), cfg.batch_size, seed=cfg.seed * 1000 + rank + 500)
                               if text else None)
        self.pair_sampler = (InfiniteSampler(len(self.pairs), cfg.batch_size, seed=cfg.seed * 1000 + rank + 700)
                             if self.pairs is not None else None)
        self.step = 0
        self.generator_updates = 0

    # --- helpers --------------------------------------------------------------------------
    @property
    def generator_module(self):
        return self.acc.unwrap_model(self.generator)

    @property
    def critic_module(self) -> Critic:
        return self.acc.unwrap_model(self.critic)

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                              enabled=self.mixed_precision == "bf16")

    def real_batch(self):
        """Real images (UNet space) and their own conditions (class labels or captions)."""
        idx = self.sampler.next()
        specs = self.labels[idx] if isinstance(self.labels, torch.Tensor) else [self.labels[i] for i in idx.tolist()]
        return self.images[idx].to(self.device).float(), self.family.condition(specs).to(self.device)

    def generator_condition(self, real_cond):
        """The generator's conditions: the real batch's labels (pixel) or prompts drawn from the prompt list."""
        if self.prompt_sampler is None:
            return real_cond
        return self.family.condition([self.prompts[i] for i in self.prompt_sampler.next().tolist()])

    def _clip(self, module, max_norm: float) -> float:
        if self.sharded:
            return sharding.clip_grad_norm_(module.parameters(), max_norm)
        return float(self.acc.clip_grad_norm_(module.parameters(), max_norm))

    def _no_sync(self, module):
        # DDP: its wrapper must not wait for gradients of a frozen module; FSDP: a frozen module has none to reduce.
        return contextlib.nullcontext() if self.sharded else self.acc.no_sync(module)

    def _randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=self.rng).to(self.device)

    def _guidance(self, n: int) -> torch.Tensor | None:
        """Each sample's guidance scale w (guidance-conditioned students; None otherwise), from the training RNG."""
        if not self.guided:
            return None
        low, high = self.cfg.guidance_range
        return sample_guidance(n, low, high, self.cfg.guidance_sampling, self.rng).to(self.device)

    @property
    def default_guidance(self) -> float | None:
        """The w that sample grids and quick evaluations use (guidance-conditioned students); None otherwise."""
        return self.cfg.real_guidance if self.guided else None

    def _check(self, named: dict) -> None:
        for name, value in named.items():
            if not torch.isfinite(value).all():
                raise NonFiniteLoss(f"step {self.step}: loss {name} is {value.item()}")

    def _real_guidance(self, t_dm: torch.Tensor, w: torch.Tensor | None):
        """The real score's CFG scale for DM noise levels `t_dm`: the guided student's per-sample w, else
        real_guidance, with real_guidance_above's w at and above its t (one scale per sample)."""
        if w is not None:
            return w
        if self.cfg.real_guidance_above is None:
            return self.cfg.real_guidance
        t_from, w_high = self.cfg.real_guidance_above
        return torch.where(t_dm >= int(t_from), float(w_high), float(self.cfg.real_guidance)).to(torch.float32)

    def _divergence_weights(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """`dm_divergence`'s per-sample weights for this rank's samples, normalised over the whole batch (every
        rank's), so that a process's few samples are not weighed only against each other."""
        if not torch.isfinite(log_ratio).all():
            raise NonFiniteLoss(f"step {self.step}: the GAN head's log density ratio, which dm_divergence="
                                f"{self.cfg.dm_divergence} weights the DM gradient by, is not finite")
        if self.acc.num_processes == 1:
            return losses.divergence_weights(log_ratio, self.cfg.dm_divergence)
        n, rank = len(log_ratio), self.acc.process_index
        everyone = self.acc.gather(log_ratio.contiguous())   # equal batches on every rank
        return losses.divergence_weights(everyone, self.cfg.dm_divergence)[rank * n:(rank + 1) * n]

    # --- the two updates ------------------------------------------------------------------
    def _dmd_loss(self, x, eps, t_dm, cond, k, w, extra: dict) -> torch.Tensor:
        """DMD's distribution-matching surrogate: the two scores read a detached noised copy of x, and their
        difference is x's gradient (weighted per sample by dm_divergence's h(p/q))."""
        fam = self.family
        noisy = fam.schedule.add_noise(x.detach(), eps, t_dm)
        weights = None
        with torch.no_grad(), self.autocast():
            # The real score: the teacher with CFG at each sample's w (guided), or at real_guidance
            # (with real_guidance_above [t, w']: w' for the samples noised to t or more).
            x0_real = fam.denoise(self.real_unet, noisy, t_dm, cond, guidance=self._real_guidance(t_dm, w)).float()
            x0_fake = self.critic(noisy, t_dm, cond, call="fake_x0", step=k, guidance_input=w).float()
            if self.cfg.dm_divergence != "reverse-kl":
                # log p_t / q_t at the same noisy samples, from the GAN head (its logit), for h(r)
                log_ratio = self.critic(x.detach(), cond, t_dm, eps, call="realism_logits", step=k,
                                        guidance_input=w).float()
                weights = self._divergence_weights(log_ratio)
                extra["dm_log_ratio"] = log_ratio.mean()
                extra["dm_weight_max"] = weights.max()
        return losses.distribution_matching_loss(x, x0_real, x0_fake, weights)

    def _score_identity_loss(self, x, eps, t_dm, cond, k, w, extra: dict) -> torch.Tensor:
        """SiD's loss (dm_loss: sid): the same noised copy of x as DMD's, but not detached, so the gradient
        flows back to x through both scores (their weights frozen: the teacher's always, the critic's here)."""
        fam = self.family
        noisy = fam.schedule.add_noise(x, eps, t_dm)
        with self.autocast():
            x0_real = fam.denoise(self.real_unet, noisy, t_dm, cond, guidance=self._real_guidance(t_dm, w)).float()
            x0_fake = self.critic(noisy, t_dm, cond, call="fake_x0", step=k, guidance_input=w).float()
        extra["dm_score_gap"] = (x0_real - x0_fake).detach().square().mean()
        return losses.score_identity_loss(x, x0_real, x0_fake, self.cfg.sid_alpha)

    def critic_step(self, real_x0, cond, real_cond=None) -> dict:
        """One update of the fake score (denoising on detached generator samples) and the GAN head.

        `cond` conditions the generator; `real_cond` the real images (default: the same).
        """
        cfg, fam, n = self.cfg, self.family, real_x0.shape[0]
        T = fam.schedule.num_train_timesteps
        w = self._guidance(n)
        with torch.no_grad(), self.autocast():
            x_t, t = generator_input(fam, self.generator_module, cond, n, self.timesteps, self.rng, self.device,
                                     cfg.backward_simulation, real_x0, cfg.step_weights, guidance_input=w, renoise=cfg.renoise)
            fake_x0 = fam.denoise(self.generator_module, x_t, t, cond, guidance_input=w).float()
        draws = {"t": self._randint(0, T, n), "noise": randn(fake_x0.shape, self.rng, self.device)}
        if w is not None:
            draws["w"] = w
        if cfg.use_gan:
            draws.update(gan_t_fake=self._randint(0, cfg.gan_max_t, n), gan_noise_fake=randn(fake_x0.shape, self.rng, self.device),
                         gan_t_real=self._randint(0, cfg.gan_max_t, n), gan_noise_real=randn(real_x0.shape, self.rng, self.device))
        with self.autocast():
            out = self.critic(fake_x0, cond, real_x0, cond if real_cond is None else real_cond, draws,
                              step=self.timesteps.index(int(t[0])))
        total = out["fake_denoise"]
        if cfg.use_gan:
            total = total + cfg.gan_critic_weight * out["gan_critic"]
        self._check({k: out[k] for k in ("fake_denoise", "gan_critic") if k in out})
        self.opt_c.zero_grad(set_to_none=True)
        self.acc.backward(total)
        grad_norm = self._clip(self.critic, cfg.grad_clip)
        self.opt_c.step()
        self.opt_c.zero_grad(set_to_none=True)  # free the gradients between steps
        self.sched_c.step()
        stats = {f"critic/{k}": v.item() for k, v in out.items()}
        stats["critic/grad_norm"] = float(grad_norm)
        stats["critic/lr"] = self.sched_c.get_last_lr()[0]
        return stats

    def generator_step(self, real_x0, cond) -> dict:
        """One generator update: distribution matching + GAN generator loss (+ DMD's regression term on a batch
        of teacher pairs); the critic stays frozen."""
        cfg, fam, n = self.cfg, self.family, real_x0.shape[0]
        w = self._guidance(n)
        with torch.no_grad(), self.autocast():
            x_t, t = generator_input(fam, self.generator_module, cond, n, self.timesteps, self.rng, self.device,
                                     cfg.backward_simulation, real_x0, cfg.step_weights, guidance_input=w, renoise=cfg.renoise)
        if self.pairs is not None:  # 1-step: the pairs' noise joins the batch, so the generator runs once
            idx = self.pair_sampler.next()
            x_t = torch.cat([x_t, self.pairs.noise[idx]])
            cond = torch.cat([cond, self.pairs.labels[idx].to(cond.device)])
            t = torch.cat([t, t[:1].expand(len(idx))])
        with self.autocast():
            x = fam.denoise(self.generator, x_t, t, cond, guidance_input=w).float()
        parts, extra = {}, {}   # extra: diagnostics logged beside the loss terms, not added to them
        if self.pairs is not None:
            parts["regression"] = losses.regression_loss(x[n:], self.pairs.target[idx])
            x, cond, t = x[:n], cond[:n], t[:n]
        k = self.timesteps.index(int(t[0]))  # the student step being trained (one per batch)
        # Frozen: no weight gradients for the critic; no_sync: its DDP wrapper expects none.
        with self.critic_module.frozen(), self._no_sync(self.critic):
            if cfg.dm_weight > 0:
                T = fam.schedule.num_train_timesteps
                t_dm = self._randint(int(cfg.dm_min_t * T), int(cfg.dm_max_t * T) + 1, n).clamp(max=T - 1)
                eps = randn(x.shape, self.rng, self.device)
                if cfg.dm_loss == "sid":
                    parts["dm"] = self._score_identity_loss(x, eps, t_dm, cond, k, w, extra)
                else:
                    parts["dm"] = self._dmd_loss(x, eps, t_dm, cond, k, w, extra)
            if cfg.gan_generator_weight > 0:
                with self.autocast():
                    logits = self.critic(x, cond, self._randint(0, cfg.gan_max_t, n),
                                         randn(x.shape, self.rng, self.device), call="realism_logits", step=k,
                                         guidance_input=w)
                parts["gan_generator"] = losses.gan_generator_loss(logits)
            self._check(parts)
            total = (cfg.dm_weight * parts.get("dm", 0.0) + cfg.gan_generator_weight * parts.get("gan_generator", 0.0)
                     + cfg.regression_weight * parts.get("regression", 0.0))
            self.opt_g.zero_grad(set_to_none=True)
            self.acc.backward(total)
        grad_norm = self._clip(self.generator, cfg.grad_clip)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.sched_g.step()
        self.generator_updates += 1
        if self.ema is not None:
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.generator_module.parameters()):
                    if p.requires_grad:  # a LoRA's frozen base stays as it is
                        pe.lerp_(p, 1 - cfg.ema_decay)
        stats = {f"generator/{k}": v.item() for k, v in {**parts, **extra}.items()}
        stats["generator/grad_norm"] = float(grad_norm)
        stats["generator/lr"] = self.sched_g.get_last_lr()[0]
        return stats

    def train_step(self) -> dict:
        """One step: a critic update, plus a generator update on every `ttur`-th step (TTUR)."""
        self.step += 1
        real_x0, real_cond = self.real_batch()
        stats = self.critic_step(real_x0, self.generator_condition(real_cond), real_cond)
        if self.step % self.cfg.ttur == 0:
            real_x0, real_cond = self.real_batch()
            stats.update(self.generator_step(real_x0, self.generator_condition(real_cond)))
        return stats

    # --- state ----------------------------------------------------------------------------
    def student(self) -> torch.nn.Module:
        """The network to export and evaluate: the EMA if kept, else the raw generator."""
        return self.ema if self.ema is not None else self.generator_module

    def student_meta(self) -> dict:
        """What dmd2.json records beside the student: its timesteps, family and teacher, and for a
        guidance-conditioned student its guidance range and default w."""
        meta = dict(timesteps=self.timesteps, family=self.family.name, teacher=self.cfg.teacher)
        if self.cfg.renoise != "fresh":   # how it moves between steps, as trained (absent: fresh, DMD2's)
            meta["renoise"] = self.cfg.renoise
        if isinstance(self.family.schedule, FlowSchedule):  # the sigmas its timesteps mean
            meta.update(schedule="flow", flow_shift=self.family.schedule.shift)
        if self.guided:
            meta.update(guidance_range=list(self.cfg.guidance_range), guidance_default=self.cfg.real_guidance,
                        guidance_sampling=self.cfg.guidance_sampling)
        return meta

    def full_student(self) -> torch.nn.Module | None:
        """`student()` as a plain module; under FSDP gathered from the shards (call on every rank; None off rank 0)."""
        if not self.sharded:
            return self.student()
        state = sharding.full_model_state(self.generator)
        if not self.acc.is_main_process:
            return None
        depth = self.cfg.generator_layers_per_block  # the generator's network, not the teacher's
        unet = copy.deepcopy(self.real_unet) if depth is None else deepen(self.real_unet, depth)
        unet = unet.to("cpu", torch.float32)
        if self.cfg.lora_rank:
            add_lora(unet, self.cfg.lora_rank, self.cfg.lora_alpha,
                     self.cfg.lora_target_modules or self.family.lora_target_modules)
        unet.load_state_dict(state)
        return unet

    def state_dict(self, sharded: bool = False) -> dict:
        """Everything a checkpoint holds (under FSDP a collective: every rank calls it, rank 0 gets the states).

        sharded: leave the networks and optimisers out (format "sharded"): `sharded_state()` holds them, for DCP.
        """
        if sharded:
            generator = critic = opt_g = opt_c = None
        elif self.sharded:
            generator, opt_g = sharding.full_state(self.generator, self.opt_g)
            critic, opt_c = sharding.full_state(self.critic, self.opt_c)
        else:
            generator, critic = self.generator_module.state_dict(), self.critic_module.state_dict()
            opt_g, opt_c = self.opt_g.state_dict(), self.opt_c.state_dict()
        return {
            "format": "sharded" if sharded else "full",
            "step": self.step,
            "generator_updates": self.generator_updates,
            "generator": generator,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "critic": critic,
            "opt_g": opt_g,
            "opt_c": opt_c,
            "sched_g": self.sched_g.state_dict(),
            "sched_c": self.sched_c.state_dict(),
            "rng": self.rng.get_state(),
            "sampler": self.sampler.state_dict(),
            "prompt_sampler": self.prompt_sampler.state_dict() if self.prompt_sampler else None,
            "pairs": self.pairs.digest if self.pairs is not None else None,   # which pairs file (its arrays)
            # Every rank draws its own noise and data: their positions, so that each rank resumes its own.
            "ranks": self._gathered(self._draw_state()),
        }

    def sharded_state(self) -> dict:
        """The networks and optimisers as this rank holds them (DTensor shards under FSDP), for a DCP checkpoint;
        a collective under FSDP."""
        gen, critic = (self.generator, self.critic) if self.sharded else (self.generator_module, self.critic_module)
        generator, opt_g = sharding.local_state(gen, self.opt_g)
        critic_state, opt_c = sharding.local_state(critic, self.opt_c)
        return {"generator": generator, "critic": critic_state, "opt_g": opt_g, "opt_c": opt_c}

    def _draw_state(self) -> dict:
        return {"rng": self.rng.get_state(), "sampler": self.sampler.state_dict(),
                "prompt_sampler": self.prompt_sampler.state_dict() if self.prompt_sampler else None,
                "pair_sampler": self.pair_sampler.state_dict() if self.pair_sampler else None}

    def _gathered(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (a collective when there are several processes)."""
        import torch.distributed as dist

        if self.acc.num_processes == 1 or not dist.is_initialized():
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def load_state_dict(self, state: dict, read_shards=None) -> None:
        """Restore a checkpoint's state; a "sharded" one also needs `read_shards(template)`, which fills this
        rank's `sharded_state()` in place from the checkpoint's DCP folder."""
        saved_pairs = state.get("pairs")
        if self.pairs is not None and saved_pairs is not None and saved_pairs != self.pairs.digest:
            raise RunError(f"this run was trained on other regression pairs (digest {saved_pairs}) than "
                           f"{self.cfg.regression_pairs} ({self.pairs.digest}); resume with the same file")
        if state.get("format") == "sharded":
            if read_shards is None:
                raise RunError("this checkpoint is sharded (checkpoint_format: sharded): its weights are in its dcp/ "
                               "folder, which this caller does not read")
            shards = self.sharded_state()  # the template: this rank's shapes and placements
            read_shards(shards)
            gen, critic = (self.generator, self.critic) if self.sharded else (self.generator_module, self.critic_module)
            sharding.load_local_state(gen, self.opt_g, shards["generator"], shards["opt_g"])
            sharding.load_local_state(critic, self.opt_c, shards["critic"], shards["opt_c"])
        elif self.sharded:
            sharding.load_full_state(self.generator, self.opt_g, state["generator"], state["opt_g"])
            sharding.load_full_state(self.critic, self.opt_c, state["critic"], state["opt_c"])
        else:
            self.generator_module.load_state_dict(state["generator"])
            self.critic_module.load_state_dict(state["critic"])
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_c.load_state_dict(state["opt_c"])
        if self.ema is not None:
            if state["ema"] is None:
                raise RunError("the checkpoint has no EMA weights but the config asks for ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        # The config is the truth for the base LRs (a resume may change them with --set): the schedulers keep
        # the base LRs they were built with and take only their position from the checkpoint; one step back
        # and forward through the public API sets the current LR (and get_last_lr) at the restored step.
        for sched, saved in ((self.sched_g, state["sched_g"]), (self.sched_c, state["sched_c"])):
            sched.load_state_dict({k: v for k, v in saved.items() if k not in ("base_lrs", "_last_lr")})
            for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
                group["initial_lr"] = base
            sched.last_epoch -= 1
            sched.step()
        ranks = state.get("ranks") or []  # checkpoints before per-rank states: every rank takes rank 0's
        mine = ranks[self.acc.process_index] if len(ranks) == self.acc.num_processes else state
        self.rng.set_state(mine["rng"])
        self.sampler.load_state_dict(mine["sampler"])
        if self.prompt_sampler is not None:
            self.prompt_sampler.load_state_dict(mine["prompt_sampler"])
        if self.pair_sampler is not None and mine.get("pair_sampler") is not None:  # else: regression added on resume
            self.pair_sampler.load_state_dict(mine["pair_sampler"])
        self.step = state["step"]
        self.generator_updates = state["generator_updates"]

    def grid_specs(self) -> list:
        """The fixed conditions of the sample grids: 100 labels cycling the classes, or the first 4 prompts."""
        if self.prompt_sampler is None:
            return np.arange(100) % self.family.num_classes
        return [self.prompts[i % len(self.prompts)] for i in range(4)]

    @torch.no_grad()
    def sample(self, labels, seed: int, unet=None, guidance: float | None = None) -> torch.Tensor:
        """Student samples in [-1, 1] from fixed noise (its own generator: training RNG is untouched);
        a guidance-conditioned student at `guidance` (default: `default_guidance`)."""
        unet = unet or self.student()
        w = (self.default_guidance if guidance is None else guidance) if self.guided else None
        noise = torch.randn(self.family.latent_shape(len(labels)), generator=torch.Generator().manual_seed(seed))
        x = student_sample(self.family, unet, self.family.condition(labels).to(self.device),
                           noise.to(self.device), self.timesteps, seed=renoise_seed(seed), autocast=self.cfg.frozen_dtype == "bf16",
                           guidance_input=w, renoise=self.cfg.renoise)
        return self.family.decode(x)


def speed_up(network: torch.nn.Module, compile: bool = False, channels_last: bool = False) -> None:
    """In place: `network`'s weights in channels_last memory format, and/or its calls compiled (inductor)."""
    if channels_last:
        # A conv with channels_last weights returns channels_last activations (on CPU and GPU), so the layout
        # follows from the first conv on; `to` keeps the Parameter objects, so optimisers and DDP are unaffected.
        network.to(memory_format=torch.channels_last)
    if compile:
        # nn.Module.compile(), not `torch.compile(network)`: the module stays itself (no OptimizedModule wrapper),
        # so its state dict keeps the plain keys (no "_orig_mod."), checkpoints and exports do not change, and
        # the optimisers, the EMA's zip over parameters and DDP see the same object. Only `__call__` (forward
        # and its hooks, e.g. the per-step critic's) is compiled; `family.bottleneck` calls sub-modules
        # directly, so the GAN's bottleneck runs eagerly, on the same weights.
        network.compile()


GUIDANCE_WEIGHTS = ("time_embedding.cond_proj.weight",)   # a guidance-conditioned network's own weights


def init_generator(generator: torch.nn.Module, student: torch.nn.Module, source) -> None:
    """Copy a saved student's weights into the generator (a copy of the teacher, or its deepened copy), which must
    match it exactly; a guidance-conditioned generator may start from a plain student (its guidance projection
    stays zero)."""
    ours, theirs = generator.state_dict(), student.state_dict()
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing and set(missing) <= set(GUIDANCE_WEIGHTS):
        theirs = {**theirs, **{k: ours[k] for k in missing}}
        missing = []
    shapes = [k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape]
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise ConfigError(f"generator_init {str(source)!r}: its network differs from the generator's (the "
                          f"teacher's, deepened if generator_layers_per_block is set): {len(missing)} missing, "
                          f"{len(extra)} extra, {len(shapes)} reshaped tensors, e.g. {first}")
    generator.load_state_dict(theirs)


# --- the run -------------------------------------------------------------------------------
