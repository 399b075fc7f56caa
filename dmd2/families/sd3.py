"""Stable Diffusion 3 class (SD3 / SD3.5 medium and large): an MMDiT `SD3Transformer2DModel`, three text
encoders (CLIP-L, CLIP-G, T5), a 16-channel VAE with a shift factor, rectified flow with a timestep shift.

Teacher: any diffusers `StableDiffusion3Pipeline` folder or Hub repo (`stabilityai/stable-diffusion-3-medium-diffusers`,
gated). DMD2 published no SD3 student; our own runs load with `load_student(folder)`.

Facts matched here (tests/test_sd3.py checks them against diffusers 0.42's pipeline):
- the schedule: x_t = (1 - s) x0 + s eps with s = shift u / (1 + (shift - 1) u) (Esser et al. 2024, eq. 23),
  shift from the folder's scheduler config (3.0 for SD3 medium); the transformer takes s * 1000;
- the output is the flow velocity u = eps - x0 (diffusers' SD3 trainers regress `noise - model_input`, and
  FlowMatchEulerDiscreteScheduler steps x + (s_next - s) u), which is `Schedule.target(..., "flow")`;
  the sampler cross-check (our Euler vs the pipeline's, same latents) would fail with the other sign;
- the text conditioning is `StableDiffusion3Pipeline.encode_prompt`: both CLIPs' penultimate hidden states
  concatenated, zero-padded to the T5 width, then the T5 sequence appended; pooled = both CLIPs' projections;
- the unconditional input is the pipeline's for the empty negative prompt: all three encoders on "".

Guidance: `default_guidance = 7.0` is diffusers' StableDiffusion3Pipeline default `guidance_scale` (28 steps);
`real_guidance = 7.0` (DMD2's real-score CFG) is the same number: the DMD2 paper has no SD3 setting (it used
8 for SDXL, 1.75 for SD1.5), so this is the teacher's own recommended CFG, not a validated distillation value.
The GAN's bottleneck is the image tokens after the middle block (block L/2 - 1 of L), as a (N, D, h/p, w/p) grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmd2.families.base import Family, ModelLoadError, unwrap
from dmd2.families.lora import student_lora_file
from dmd2.families.sd import StableDiffusionFamily, TextCondition, resolve_device_dtype
from dmd2.families.sd_loading import (fill_from_state_dict, first_line, load_part, load_state_dict_file, load_vaes,
                                      move_to, param_dtype)
from dmd2.families.transformer_lora import fuse_transformer_lora, save_transformer_student
from dmd2.hub import hub_kwargs
from dmd2.schedule import FlowSchedule

SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
# LoRA targets: the joint attention's projections of both streams, diffusers' default in
# examples/dreambooth/train_dreambooth_lora_sd3.py (`--lora_layers` unset).
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# Scheduler options whose sigmas FlowSchedule does not reproduce.
_UNSUPPORTED_SCHEDULER = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                          "use_beta_sigmas", "invert_sigmas")


class SD3Family(Family):
    """SD3 behind the `Family` interface; build it with `SD3Family.from_pretrained(folder_or_repo)`.

    Holds the frozen parts (three text encoders, tokenizers, VAE) and the transformer's config; the
    transformers themselves (teacher, students, the trainer's copies) are passed to each call.
    """

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    transformer_subfolder = "transformer"
    prediction_type = "flow"
    default_guidance = 7.0
    real_guidance = 7.0
    lora_target_modules = SD3_LORA_TARGETS
    published: dict = {}

    # The VAE latents work as in the SD families (scaled, shifted by the VAE's shift_factor): the same code.
    encode = StableDiffusionFamily.encode
    decode = StableDiffusionFamily.decode
    latent_shape = StableDiffusionFamily.latent_shape
    cat_conditions = StableDiffusionFamily.cat_conditions
    timesteps_of = StableDiffusionFamily.timesteps_of

    def __init__(self, source, *, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3,
                 vae: nn.Module, transformer_config: dict, scheduler_config: dict, tiny_vae: nn.Module | None = None,
                 device=None, dtype=None, height: int | None = None, width: int | None = None,
                 max_sequence_length: int = 256, load_kwargs: dict | None = None):
        self.source = str(source)
        self.load_kwargs = dict(load_kwargs or {})
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.vae, self.tiny_vae, self.use_tiny_vae = vae, tiny_vae, tiny_vae is not None
        self.transformer_config = dict(transformer_config)
        self.max_sequence_length = int(max_sequence_length)  # T5 tokens, the pipeline's default 256
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.patch_size = self.transformer_config["patch_size"]
        default_size = self.transformer_config["sample_size"] * self.vae_scale_factor
        self.height = int(height or default_size)
        self.width = int(width or default_size)
        self.latent_channels = self.transformer_config["in_channels"]
        self.schedule = flow_schedule(self.source, scheduler_config)
        self._empty: TextCondition | None = None

    @classmethod
    def from_pretrained(cls, source=SD3_MEDIUM, *, device=None, dtype=None, vae=None, vae_subfolder=None,
                        tiny_vae=None, height=None, width=None, max_sequence_length: int = 256,
                        **kwargs) -> "SD3Family":
        """Text encoders, tokenizers and VAE of an SD3 folder or Hub repo, in `dtype` on `device` (default fp16 on
        CUDA, fp32 on CPU). kwargs go to every from_pretrained (revision, local_files_only, cache_dir, ...;
        variant only to the text encoders and, through `load_teacher`, the transformer)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        device, dtype = resolve_device_dtype(device, dtype)
        transformer_config, sched = load_sd3_configs(source, **hub_kwargs(kwargs))  # before loading anything big
        te = load_part(CLIPTextModelWithProjection, source, subfolder="text_encoder", dtype=dtype, **kwargs)
        te2 = load_part(CLIPTextModelWithProjection, source, subfolder="text_encoder_2", dtype=dtype, **kwargs)
        te3 = load_part(T5EncoderModel, source, subfolder="text_encoder_3", dtype=dtype, **kwargs)
        tok = load_part(CLIPTokenizer, source, subfolder="tokenizer", **hub_kwargs(kwargs))
        tok2 = load_part(CLIPTokenizer, source, subfolder="tokenizer_2", **hub_kwargs(kwargs))
        tok3 = load_part(AutoTokenizer, source, subfolder="tokenizer_3", **hub_kwargs(kwargs))
        kl, tiny = load_vaes(source, device, dtype, vae=vae, vae_subfolder=vae_subfolder, tiny_vae=tiny_vae,
                             **hub_kwargs(kwargs))
        frozen = [m.to(device).eval().requires_grad_(False) for m in (te, te2, te3)]
        return cls(source, text_encoder=frozen[0], text_encoder_2=frozen[1], text_encoder_3=frozen[2],
                   tokenizer=tok, tokenizer_2=tok2, tokenizer_3=tok3, vae=kl, tiny_vae=tiny,
                   transformer_config=transformer_config, scheduler_config=sched, device=device, dtype=dtype,
                   height=height, width=width, max_sequence_length=max_sequence_length, load_kwargs=kwargs)

    # --- conditioning -----------------------------------------------------------------------
    def _clip(self, encoder, tokenizer, prompts):
        # The pipeline pads both CLIP tokenizers to the first one's model_max_length (77 for SD3).
        ids = tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # penultimate hidden states, projected pooled output

    @torch.no_grad()
    def condition(self, prompts) -> TextCondition:
        """Prompts -> prompt_embeds (N, 77 + 256, T5 width) and pooled_projections (N, 768 + 1280), exactly as
        `StableDiffusion3Pipeline.encode_prompt` (clip_skip None, one image per prompt)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        h1, pooled1 = self._clip(self.text_encoder, self.tokenizer, prompts)
        h2, pooled2 = self._clip(self.text_encoder_2, self.tokenizer_2, prompts)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        t5 = self.text_encoder_3(ids)[0]
        clip = torch.cat([h1, h2], dim=-1).to(t5.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-padded to the T5 width
        return TextCondition(prompt_embeds=torch.cat([clip, t5], dim=-2),
                             pooled_projections=torch.cat([pooled1, pooled2], dim=-1))

    def null_condition(self, n: int) -> TextCondition:
        """The pipeline's unconditional input: the embedding of the empty negative prompt, computed once."""
        if self._empty is None:
            self._empty = self.condition([""])
        return TextCondition({k: v.expand(n, *v.shape[1:]) for k, v in self._empty.items()})

    # --- networks ---------------------------------------------------------------------------
    def _inputs(self, transformer, x_t, t, cond, guidance_input):
        if guidance_input is not None:
            raise ValueError("SD3 transformers are not guidance-conditioned: they take no guidance scale as an input")
        dtype = param_dtype(transformer)
        timestep = self.schedule.model_timestep(t).to(x_t.device, torch.float32).reshape(-1).expand(x_t.shape[0])
        return (x_t.to(dtype), timestep, cond["prompt_embeds"].to(x_t.device, dtype),
                cond["pooled_projections"].to(x_t.device, dtype))

    def model_output(self, transformer, x_t, t, cond, guidance_input=None):
        """The velocity u = eps - x0 at schedule timestep t (the transformer takes sigma * 1000)."""
        sample, timestep, ehs, pooled = self._inputs(transformer, x_t, t, cond, guidance_input)
        return transformer(hidden_states=sample, timestep=timestep, encoder_hidden_states=ehs,
                           pooled_projections=pooled, return_dict=False)[0]

    def bottleneck(self, transformer, x_t, t, cond, guidance_input=None):
        """SD3Transformer2DModel.forward (diffusers 0.42) up to and including the middle block (L/2 - 1 of L
        blocks); the later blocks and the output head never run. The image tokens come back as a grid
        (N, D, h/p, w/p), so the conv GAN heads work over it as over a UNet's mid-block features."""
        sample, timestep, ehs, pooled = self._inputs(transformer, x_t, t, cond, guidance_input)
        tr = unwrap(transformer)
        height, width = sample.shape[-2:]
        hidden = tr.pos_embed(sample).contiguous()  # patchify + positional embedding: (N, h/p * w/p, D), row-major
        temb = tr.time_text_embed(timestep, pooled)
        ehs = tr.context_embedder(ehs)
        for block in tr.transformer_blocks[:self.bottleneck_blocks(tr)]:
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                ehs, hidden = tr._gradient_checkpointing_func(block, hidden, ehs, temb, None)
            else:
                ehs, hidden = block(hidden_states=hidden, encoder_hidden_states=ehs, temb=temb)
        p = tr.config.patch_size
        return hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], height // p, width // p)

    @staticmethod
    def bottleneck_blocks(transformer=None, num_layers: int | None = None) -> int:
        """How many transformer blocks the bottleneck runs: the first half, L // 2 (at least 1)."""
        layers = num_layers if num_layers is not None else len(unwrap(transformer).transformer_blocks)
        return max(1, layers // 2)

    def bottleneck_channels(self, transformer=None) -> int:
        cfg = self.transformer_config
        return cfg["num_attention_heads"] * cfg["attention_head_dim"]

    def bottleneck_size(self, transformer=None) -> int:
        """The token grid's shorter side at the family's resolution (the GAN head's input size)."""
        return min(self.latent_shape(1)[-2:]) // self.patch_size

    # --- weights ----------------------------------------------------------------------------
    def _ready(self, transformer: nn.Module) -> nn.Module:
        return move_to(transformer, self.device, self.dtype).eval().requires_grad_(False)

    @classmethod
    def for_training(cls, teacher, *, device=None, frozen_dtype=torch.float32, resolution=None):
        """Text encoders and VAE in `frozen_dtype` and the teacher transformer in fp32 (the trainer copies it into
        the generator and the fake score, which train in fp32 master weights)."""
        from diffusers import SD3Transformer2DModel

        family = cls.from_pretrained(teacher, device=device, dtype=frozen_dtype, height=resolution, width=resolution)
        family.check_resolution()
        transformer = load_part(SD3Transformer2DModel, teacher, subfolder=cls.transformer_subfolder,
                                dtype=torch.float32, **family.load_kwargs)
        return family, transformer.to(family.device).eval().requires_grad_(False)

    def check_resolution(self) -> None:
        """The image size must give whole patches and fit the transformer's positional embedding."""
        down = self.vae_scale_factor * self.patch_size
        if self.height % down or self.width % down:
            raise ValueError(f"resolution {self.height}x{self.width}: must be a multiple of {down} for the "
                             f"transformer of {self.source}")
        most = self.transformer_config.get("pos_embed_max_size") or self.transformer_config["sample_size"]
        if max(self.height, self.width) // down > most:
            raise ValueError(f"resolution {self.height}x{self.width}: more than {most * down} px, the largest the "
                             f"positional embedding of {self.source} covers")

    def load_teacher(self, path=None, **kwargs) -> nn.Module:
        """The teacher transformer from a diffusers pipeline folder or Hub repo (default: the family's source)."""
        from diffusers import SD3Transformer2DModel

        kwargs = {**self.load_kwargs, **kwargs} if path is None else kwargs
        return self._ready(load_part(SD3Transformer2DModel, path or self.source, subfolder=self.transformer_subfolder,
                                     dtype=self.dtype, **kwargs))

    def new_unet(self, **overrides) -> nn.Module:
        """An uninitialised transformer with the teacher's config (and `overrides`), on the meta device."""
        from accelerate import init_empty_weights
        from diffusers import SD3Transformer2DModel

        with init_empty_weights(include_buffers=False):
            return SD3Transformer2DModel.from_config({**self.transformer_config, **overrides})

    def unet_from_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "state dict") -> nn.Module:
        """A transformer with the teacher's config and exactly these weights (every key must match)."""
        return self._ready(fill_from_state_dict(self.new_unet(), state_dict, self.dtype, what,
                                                f"the SD3 transformer of {self.source}"))

    def load_student(self, path, lora_scale: float = 1.0, **kwargs) -> nn.Module:
        """A student transformer from: a folder of our runs (`save_student`: a diffusers SD3Transformer2DModel
        folder, or a LoRA folder), a full transformer state dict (.safetensors, or .bin read with
        weights_only=True), or a LoRA file (fused into the teacher)."""
        from diffusers import SD3Transformer2DModel

        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"SD3 student not found: {path}")
        if path.is_dir() and not (path / "config.json").is_file():
            path = student_lora_file(path)  # a LoRA student folder (save_student)
        if path.is_dir():
            _check_class(path / "config.json", "SD3Transformer2DModel")
            return self._ready(load_part(SD3Transformer2DModel, path, dtype=self.dtype))
        state_dict = load_state_dict_file(path)
        if any("lora" in k for k in state_dict):
            teacher = self.load_teacher()
            fuse_transformer_lora(teacher, path, self.pipeline_class, scale=lora_scale)  # the file: its metadata too
            return teacher
        return self.unet_from_state_dict(state_dict, what=str(path))

    def save_student(self, transformer, path, **extra) -> None:
        """A diffusers SD3Transformer2DModel folder (config.json + safetensors, loads in plain diffusers), or for
        a transformer with a PEFT LoRA adapter only the LoRA (`pytorch_lora_weights.safetensors`, loads with
        `StableDiffusion3Pipeline.load_lora_weights(folder)`); and dmd2.json with `extra`, family and teacher."""
        save_transformer_student(transformer, path, self.pipeline_class,
                                 {"family": self.name, "teacher": self.source, **extra})

    def student_sigmas(self, timesteps) -> list[float]:
        """The unshifted sigmas u = (t + 1) / T that make a FlowMatchEulerDiscreteScheduler with this family's shift
        step at the student's timesteps (the scheduler shifts what it is given)."""
        return [round((int(t) + 1) / self.schedule.num_train_timesteps, 6) for t in timesteps]

    def card_usage(self, teacher: str, timesteps, lora: bool = False) -> list[str]:
        """The model card's plain-diffusers recipe. FlowMatchEulerDiscreteScheduler with stochastic_sampling steps
        x0 = x - sigma u, then re-noises to the next sigma with fresh noise: exactly `student_sample`."""
        load = ("pipe.load_lora_weights('student')  # this folder" if lora else
                "pipe.transformer = SD3Transformer2DModel.from_pretrained('student')  # this folder")
        return ["Use in plain diffusers (denoise, re-noise with fresh noise at the student's sigmas; no CFG):", "",
                "```python",
                f"from diffusers import {self.pipeline_class}, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel",
                f"pipe = {self.pipeline_class}.from_pretrained('{teacher}')", load,
                "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                f"shift={self.schedule.shift:g}, stochastic_sampling=True)",
                f"image = pipe('a photo of a cat', sigmas={self.student_sigmas(timesteps)}, guidance_scale=1.0).images[0]",
                "```"]


def flow_schedule(source: str, config: dict) -> FlowSchedule:
    """The FlowSchedule of a FlowMatchEulerDiscreteScheduler config (its `shift`), refusing options it does not
    reproduce (FLUX's dynamic shifting, Karras / exponential / beta sigmas, terminal stretching)."""
    kind = config.get("_class_name")
    if kind != "FlowMatchEulerDiscreteScheduler":
        raise ModelLoadError(f"{source}: scheduler {kind!r}, but an SD3 teacher samples with "
                             f"FlowMatchEulerDiscreteScheduler (rectified flow)")
    used = [k for k in _UNSUPPORTED_SCHEDULER if config.get(k)]
    if used:
        raise ModelLoadError(f"{source}: scheduler option {used[0]}={config[used[0]]!r} is not supported by the sd3 "
                             f"family (a fixed timestep shift only)")
    try:
        return FlowSchedule(config.get("shift", 1.0), config.get("num_train_timesteps", 1000))
    except ValueError as e:
        raise ModelLoadError(f"{source}: {e}") from None


def _check_class(config_path: Path, expected: str) -> dict:
    """A diffusers config.json whose _class_name is `expected`, or a ModelLoadError that names what it is."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {config_path}: {first_line(e)}") from None
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found != expected:
        raise ModelLoadError(f"{config_path.parent} holds a {found or 'model without _class_name'}, not an {expected} "
                             f"(a student of another family?)")
    return config


def load_sd3_configs(source, **kwargs) -> tuple[dict, dict]:
    """The transformer's and the scheduler's configs of an SD3 pipeline folder or Hub repo; a folder of another
    pipeline (SDXL, FLUX, ...) fails here, naming its pipeline class."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    try:
        index = dict(DiffusionPipeline.load_config(source, **kwargs))
    except Exception as e:
        raise ModelLoadError(f"{source} is not a diffusers pipeline folder or repo (no readable model_index.json): "
                             f"{first_line(e)}") from None
    if index.get("_class_name") != SD3Family.pipeline_class:
        raise ModelLoadError(f"{source} is a {index.get('_class_name')} pipeline, not a {SD3Family.pipeline_class} "
                             f"(family sd3)")
    try:
        transformer = dict(SD3Transformer2DModel.load_config(source, subfolder="transformer", **kwargs))
        scheduler = dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", **kwargs))
    except Exception as e:
        raise ModelLoadError(f"{source}: could not read the transformer's or the scheduler's config: "
                             f"{first_line(e)}") from None
    return transformer, scheduler
