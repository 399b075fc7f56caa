"""What SDXL and SD1.5 share: diffusers folders, VAE latents, the UNet2DConditionModel call and
bottleneck, and DMD2's published student weights (full UNet state dicts, or a LoRA that
`dmd2.families.lora` fuses into the teacher).

The subclasses (`sdxl.py`, `sd15.py`) add only the text encoding and the null condition;
`sd_loading.py` reads the folders' parts and weight files for all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dmd2.families.base import Family, ModelLoadError, unwrap
from dmd2.guidance import guidance_embedding
from dmd2.families.lora import LORA_TARGET_MODULES, fuse_lora, save_unet_lora, student_lora_file
from dmd2.families.sd_loading import fill_from_state_dict, load_part, load_state_dict_file, move_to, param_dtype
from dmd2.hub import hub_file
from dmd2.schedule import NoiseSchedule

# The SD 1.x / XL noise schedule: NoiseSchedule("scaled_linear") hard-codes these betas.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class TextCondition(dict):
    """The UNet's text conditioning: a dict of batch-first tensors (`prompt_embeds`, and for SDXL
    `text_embeds` + `time_ids`) that also moves like a tensor (`.to`) and slices along the batch."""

    def to(self, *args, **kwargs) -> "TextCondition":
        return TextCondition({k: v.to(*args, **kwargs) for k, v in self.items()})

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return TextCondition({k: v[key] for k, v in self.items()})  # batch index / slice / mask

    @property
    def batch_size(self) -> int:
        return next(iter(self.values())).shape[0]


@dataclass(frozen=True)
class PublishedStudent:
    """A DMD2 student published as one weight file in a Hub repo, and how to sample it."""

    filename: str
    kind: str                       # "unet" (full state dict) or "lora" (fused into the teacher UNet)
    timesteps: tuple[int, ...]
    repo: str = "tianweiy/DMD2"


def resolve_device_dtype(device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Default: CUDA in fp16 when there is a GPU, else CPU in fp32. `dtype` may be a string ("bf16")."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


# --- the family -------------------------------------------------------------------------------
class StableDiffusionFamily(Family):
    """A latent text-to-image family on a diffusers UNet2DConditionModel + AutoencoderKL.

    Holds the frozen parts (text encoders, tokenizers, VAE) and the UNet's config; the UNets
    themselves (teacher, students, the trainer's copies) are passed to each call, as in `Family`.
    """

    unet_subfolder = "unet"
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers pipeline whose save/load_lora_weights we match
    lora_target_modules = LORA_TARGET_MODULES
    published: dict[str, PublishedStudent] = {}
    real_guidance: float = 1.0  # CFG of DMD2's real score (the frozen teacher), per the paper

    def __init__(self, source, *, vae: nn.Module, unet_config: dict, scheduler_config: dict | None = None,
                 tiny_vae: nn.Module | None = None, device=None, dtype=None,
                 height: int | None = None, width: int | None = None, load_kwargs: dict | None = None):
        self.source = str(source)
        self.load_kwargs = dict(load_kwargs or {})  # from_pretrained kwargs (revision, variant, ...) for load_teacher
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.vae = vae
        self.tiny_vae = tiny_vae
        self.use_tiny_vae = tiny_vae is not None
        self.unet_config = dict(unet_config)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        default_size = self.unet_config["sample_size"] * self.vae_scale_factor
        self.height = int(height or default_size)
        self.width = int(width or default_size)
        self.latent_channels = self.unet_config["in_channels"]
        sched = dict(SD_BETAS, **(scheduler_config or {}))
        for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
            if sched[key] != SD_BETAS[key]:
                raise ModelLoadError(f"{self.source}: scheduler {key}={sched[key]!r}, but this family supports "
                                     f"only the SD noise schedule ({key}={SD_BETAS[key]!r})")
        self.schedule = NoiseSchedule("scaled_linear", sched["num_train_timesteps"])
        self.prediction_type = sched.get("prediction_type", "epsilon")

    # --- data space -----------------------------------------------------------------------
    def latent_shape(self, n: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (n, self.latent_channels, self.height // f, self.width // f)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled VAE latents (a sample of the posterior, as DMD2 precomputes them)."""
        vae = self.vae
        dist = vae.encode(images.to(self.device, param_dtype(vae))).latent_dist
        z = dist.sample(generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((z.float() - shift) * vae.config.scaling_factor)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, tiny: bool | None = None, chunk: int = 1) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1], `chunk` images at a time (a 1024px SDXL decode is big).

        With the tiny VAE (AutoencoderTiny: taesdxl / taesd) the latents go in as they are: its
        config's scaling_factor is 1, because it was trained on the already-scaled latents.
        """
        tiny = self.use_tiny_vae if tiny is None else tiny
        if tiny and self.tiny_vae is None:
            raise ValueError("no tiny VAE loaded: pass tiny_vae=... (e.g. 'madebyollin/taesdxl') when loading")
        vae = self.tiny_vae if tiny else self.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out = []
        for part in x.split(max(1, chunk)):
            z = part.to(self.device, param_dtype(vae)) / vae.config.scaling_factor + shift
            out.append(vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out)

    # --- conditioning -----------------------------------------------------------------------
    def cat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        if a.keys() != b.keys():
            raise ValueError(f"conditions with different keys: {sorted(a)} vs {sorted(b)}")
        return TextCondition({k: torch.cat([a[k], b[k].to(a[k].device)]) for k in a})

    def added_cond_kwargs(self, cond: TextCondition, device, dtype) -> dict | None:
        """The UNet's `added_cond_kwargs` (SDXL: pooled text + micro-conditioning); None for SD1.5."""
        return None

    def _unet_inputs(self, unet, x_t, cond):
        dtype = param_dtype(unet)
        ehs = cond["prompt_embeds"].to(x_t.device, dtype)
        return x_t.to(dtype), ehs, self.added_cond_kwargs(cond, x_t.device, dtype)

    # --- networks ---------------------------------------------------------------------------
    def _timestep_cond(self, unet, guidance_input, sample):
        """diffusers' `timestep_cond` for guidance scales w: the embedding its pipelines compute from
        guidance_scale for a UNet with `time_cond_proj_dim` (None when the network takes no w)."""
        dim = unwrap(unet).config.time_cond_proj_dim
        if guidance_input is None:
            if dim is not None:
                raise ValueError("this student is guidance-conditioned: give it a guidance scale")
            return None
        if dim is None:
            raise ValueError("this network is not guidance-conditioned: it takes no guidance scale as an input")
        w = torch.as_tensor(guidance_input, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        return guidance_embedding(w, dim).to(sample.device, sample.dtype)

    def model_output(self, unet, x_t, t, cond, guidance_input=None):
        sample, ehs, added = self._unet_inputs(unet, x_t, cond)
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        return unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added,
                    timestep_cond=self._timestep_cond(unet, guidance_input, sample)).sample

    def guidance_conditioned(self, unet, dim: int) -> nn.Module:
        """A copy of `unet` with diffusers' `time_cond_proj_dim` (the guidance embedding's projection, zero
        at first): plain diffusers pipelines then pass `guidance_scale` to it as `timestep_cond`, no CFG pass."""
        from diffusers import UNet2DConditionModel

        if unet.config.time_cond_proj_dim is not None:
            raise ValueError("this network is already guidance-conditioned")
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        guided = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
        missing, unexpected = guided.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"guidance conditioning: unexpected weights {unexpected or missing}")
        torch.nn.init.zeros_(guided.time_embedding.cond_proj.weight)
        param = next(unet.parameters())
        guided.to(param.device)
        if param.dtype != guided.dtype:  # ModelMixin.to(dtype) warns about fp32-kept modules even when none
            guided.to(param.dtype)
        return guided.train(unet.training).requires_grad_(param.requires_grad)

    def bottleneck(self, unet, x_t, t, cond, guidance_input=None):
        """UNet2DConditionModel.forward (diffusers 0.42) up to and including the mid block; the up blocks never run.

        Matches the official DMD2 `classify_forward(..., classify_mode=True)` feature: the mid-block output.
        """
        sample, ehs, added = self._unet_inputs(unet, x_t, cond)
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=t),
                                  self._timestep_cond(unet, guidance_input, sample))
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            raise ValueError("class-conditional UNet2DConditionModels are not supported here")
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        h = unet.conv_in(sample)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(h, emb, encoder_hidden_states=ehs)
        return unet.mid_block(h, emb)

    def bottleneck_channels(self, unet=None) -> int:
        return self.unet_config["block_out_channels"][-1]

    # --- weights ----------------------------------------------------------------------------
    def _ready(self, unet: nn.Module) -> nn.Module:
        return move_to(unet, self.device, self.dtype).eval().requires_grad_(False)

    @classmethod
    def for_training(cls, teacher, *, device=None, frozen_dtype=torch.float32, resolution=None):
        """Text encoders and VAE in `frozen_dtype` and the teacher UNet in fp32 (the trainer copies it
        into the generator and the fake score, which train in fp32 master weights)."""
        from diffusers import UNet2DConditionModel

        family = cls.from_pretrained(teacher, device=device, dtype=frozen_dtype, height=resolution, width=resolution)
        down = 2 ** (len(family.unet_config["block_out_channels"]) - 1) * family.vae_scale_factor
        if family.height % down or family.width % down:
            raise ValueError(f"resolution {family.height}: must be a multiple of {down} for the UNet of {teacher}")
        unet = load_part(UNet2DConditionModel, teacher, subfolder=cls.unet_subfolder, dtype=torch.float32,
                         **family.load_kwargs)
        return family, unet.to(family.device).eval().requires_grad_(False)

    def load_teacher(self, path=None, **kwargs) -> nn.Module:
        """The teacher UNet from a diffusers pipeline folder or Hub repo (default: the family's source).

        kwargs go to from_pretrained, on top of the family's own (e.g. variant="fp16" to download
        SDXL's fp16 files only).
        """
        from diffusers import UNet2DConditionModel

        kwargs = {**self.load_kwargs, **kwargs} if path is None else kwargs
        unet = load_part(UNet2DConditionModel, path or self.source, subfolder=self.unet_subfolder,
                          dtype=self.dtype, **kwargs)
        return self._ready(unet)

    def new_unet(self, **overrides) -> nn.Module:
        """An uninitialised UNet with the teacher's config (and `overrides`), on the meta device (fill with
        load_state_dict(assign=True))."""
        from accelerate import init_empty_weights
        from diffusers import UNet2DConditionModel

        with init_empty_weights(include_buffers=False):
            return UNet2DConditionModel.from_config({**self.unet_config, **overrides})

    def unet_from_state_dict(self, state_dict: dict[str, torch.Tensor], what: str = "state dict") -> nn.Module:
        """A UNet with the teacher's config and exactly these weights (every key must match); a guidance-conditioned
        student's weights (with the w projection `time_embedding.cond_proj`) give the teacher's config plus its
        time_cond_proj_dim."""
        proj = state_dict.get("time_embedding.cond_proj.weight")
        unet = self.new_unet(**({"time_cond_proj_dim": proj.shape[1]} if proj is not None and proj.ndim == 2 else {}))
        return self._ready(fill_from_state_dict(unet, state_dict, self.dtype, what,
                                                f"the teacher UNet of {self.source}"))

    def published_file(self, name: str, **kwargs) -> Path:
        """The weight file of a published student, from the Hugging Face cache or the Hub."""
        spec = self.published[name]
        return hub_file(spec.filename, spec.repo, **kwargs)

    def load_student(self, path, lora_scale: float = 1.0, **kwargs) -> nn.Module:
        """A student UNet from: a published name (see `published`), a full UNet state dict
        (.bin read with weights_only=True, or .safetensors), a LoRA file (fused into the teacher),
        or a student folder of our own runs (`save_student`: a diffusers UNet folder, or a LoRA folder,
        see `student_lora_file`). kwargs go to hf_hub_download."""
        from diffusers import UNet2DConditionModel

        if str(path) in self.published:
            path = self.published_file(str(path), **kwargs)
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            path = student_lora_file(path)  # a LoRA student folder (save_student)
        if path.is_dir():
            return self._ready(load_part(UNet2DConditionModel, path, dtype=self.dtype))
        state_dict = load_state_dict_file(path)
        if any("lora" in k for k in state_dict):
            teacher = self.load_teacher()
            fuse_lora(teacher, path, scale=lora_scale, pipeline_class=self.pipeline_class)  # the file: its metadata too
            return teacher
        return self.unet_from_state_dict(state_dict, what=str(path))

    def save_student(self, unet, path, **extra) -> None:
        """A diffusers UNet folder (config.json + safetensors, loads in plain diffusers), or for a UNet
        with a PEFT LoRA adapter only the LoRA (`pytorch_lora_weights.safetensors`, loads with the
        pipeline's `load_lora_weights(folder)`); and dmd2.json with `extra` (e.g. timesteps), the family
        and teacher it belongs to, and for a LoRA its file name (`"lora"`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if getattr(unet, "peft_config", None):
            extra = {"lora": self.save_lora(unet, path).name, **extra}  # the file the readers load
        else:
            unet.save_pretrained(path, safe_serialization=True)
        meta = {"family": self.name, "teacher": self.source, **extra}
        (path / "dmd2.json").write_text(json.dumps(meta, indent=2, default=list) + "\n")

    def save_lora(self, unet, path) -> Path:
        """The UNet's one LoRA adapter in `path` as this family's pipeline writes it (see `save_unet_lora`)."""
        return save_unet_lora(unet, path, self.pipeline_class)

    def timesteps_of(self, student) -> tuple[int, ...]:
        """The sampling timesteps of a published student name or of a student folder with dmd2.json."""
        if str(student) in self.published:
            return self.published[str(student)].timesteps
        meta = Path(student) / "dmd2.json"
        if not meta.is_file():
            raise ModelLoadError(f"{student} is neither a published student ({', '.join(self.published)}) "
                                 f"nor a folder with dmd2.json naming its timesteps")
        return tuple(int(t) for t in json.loads(meta.read_text())["timesteps"])
