"""Class-conditional pixel-space UNet: the embedded MNIST default (our ImageNet-64 analog)."""

from __future__ import annotations

import contextvars
import inspect
import json
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding
from safetensors import SafetensorError

from dmd2.families.base import Family, ModelLoadError, read_json_object, unwrap
from dmd2.guidance import guidance_embedding
from dmd2.schedule import FlowSchedule, NoiseSchedule, Schedule

# Small enough to train on 2 CPU cores in well under an hour, big enough for legible digits.
DEFAULT_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=32,
    norm_num_groups=8,
    num_class_embeds=11,  # 10 digits + 1 null class for classifier-free guidance
)


class PixelFamily(Family):
    """Images are the UNet space; the condition is a class label, `num_classes` is the null class."""

    name = "pixel"

    def __init__(self, num_classes: int = 10, image_size: int = 32, channels: int = 1,
                 beta_schedule: str = "cosine", default_guidance: float = 1.0, schedule: Schedule | None = None):
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        # DDPM: v-prediction, well-posed at t=999 where the 1-step student starts; rectified flow: the velocity
        self.schedule = NoiseSchedule(beta_schedule) if schedule is None else schedule
        self.prediction_type = "flow" if isinstance(self.schedule, FlowSchedule) else "v_prediction"
        self.default_guidance = default_guidance

    @classmethod
    def from_unet(cls, unet: UNet2DModel, folder=None, **kwargs) -> "PixelFamily":
        """The family that matches a loaded UNet's config (classes, size, channels) and the schedule in its
        `folder`'s scheduler_config.json (DDPM cosine when there is none)."""
        cfg = unet.config
        if folder is not None and "schedule" not in kwargs:
            kwargs["schedule"] = read_schedule(folder)
        return cls(num_classes=cfg.num_class_embeds - 1, image_size=cfg.sample_size, channels=cfg.in_channels, **kwargs)

    def latent_shape(self, n: int) -> tuple[int, ...]:
        return (n, self.channels, self.image_size, self.image_size)

    def condition(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1}, got {labels.tolist()}")
        return labels

    def null_condition(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long)

    def model_output(self, unet, x_t, t, cond, guidance_input=None):
        t = self.schedule.model_timestep(t)
        if guidance_input is None:
            return unet(x_t, t, class_labels=cond.to(x_t.device)).sample
        return unet(x_t, t, class_labels=cond.to(x_t.device), timestep_cond=_timestep_cond(unet, guidance_input, x_t)).sample

    def bottleneck(self, unet, x_t, t, cond, guidance_input=None):
        # UNet2DModel.forward up to and including the mid block; the decoder half never runs.
        t = self.schedule.model_timestep(self.schedule.timesteps(t, x_t.shape[0], x_t.device)).to(x_t.device)
        t_emb = unet.time_proj(t).to(dtype=unet.dtype)
        if guidance_input is None:
            emb = unet.time_embedding(t_emb)
        else:
            emb = unet.time_embedding(t_emb, _timestep_cond(unet, guidance_input, x_t))
        emb = emb + unet.class_embedding(cond.to(x_t.device)).to(dtype=unet.dtype)
        h = unet.conv_in(x_t)
        for block in unet.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        return unet.mid_block(h, emb)

    def bottleneck_channels(self, unet) -> int:
        return unet.config.block_out_channels[-1]

    # --- weights ------------------------------------------------------------------------
    @classmethod
    def for_training(cls, teacher, *, device=None, frozen_dtype=torch.float32, resolution=None):
        unet = load_pixel_unet(teacher)
        family = cls.from_unet(unet, teacher)
        if resolution not in (None, family.image_size):
            raise ValueError(f"resolution {resolution}: the pixel teacher {teacher} works at {family.image_size}x"
                             f"{family.image_size} only")
        return family, unet.to(device or "cpu")

    def guidance_conditioned(self, unet: UNet2DModel, dim: int) -> "GuidedUNet2DModel":
        """A copy of `unet` that takes the guidance scale as an input; its projection starts at zero, so
        at first it computes exactly what `unet` does, whatever w."""
        if isinstance(unet, GuidedUNet2DModel):
            raise ValueError("this network is already guidance-conditioned")
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        guided = GuidedUNet2DModel(**config, time_cond_proj_dim=dim)
        missing, unexpected = guided.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or missing != ["time_embedding.cond_proj.weight"]:
            raise ValueError(f"guidance conditioning: unexpected weights {unexpected or missing}")
        torch.nn.init.zeros_(guided.time_embedding.cond_proj.weight)
        return guided.to(next(unet.parameters()).device).train(unet.training).requires_grad_(
            any(p.requires_grad for p in unet.parameters()))

    def new_unet(self, **overrides) -> UNet2DModel:
        cfg = dict(DEFAULT_UNET_CONFIG, sample_size=self.image_size, in_channels=self.channels,
                   out_channels=self.channels, num_class_embeds=self.num_classes + 1)
        cfg.update(overrides)
        return UNet2DModel(**cfg)

    def load_teacher(self, path, **kwargs) -> UNet2DModel:
        return load_pixel_unet(path)

    load_student = load_teacher

    def save_student(self, unet, path, **kwargs) -> None:
        save_pixel_unet(unet, path, **kwargs)
        (Path(path) / "scheduler_config.json").write_text(json.dumps(self.scheduler_config(), indent=2) + "\n")

    def scheduler_config(self) -> dict:
        """A diffusers scheduler config with this family's schedule, for use in plain diffusers:
        FlowMatchEulerDiscreteScheduler for a flow schedule, DDIMScheduler otherwise."""
        if isinstance(self.schedule, FlowSchedule):
            return {"_class_name": "FlowMatchEulerDiscreteScheduler",
                    "num_train_timesteps": self.schedule.num_train_timesteps, "shift": self.schedule.shift}
        names = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}
        return {"_class_name": "DDIMScheduler", "num_train_timesteps": self.schedule.num_train_timesteps,
                "beta_schedule": names[self.schedule.kind], "prediction_type": self.prediction_type,
                "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": True}


# The w embedding of the current forward of a GuidedUNet2DModel: a context variable, so concurrent forwards
# in different threads (the app's generation slots) each see their own.
_TIMESTEP_COND = contextvars.ContextVar("timestep_cond", default=None)


def _timestep_cond(unet, w, like: torch.Tensor) -> torch.Tensor:
    """The network input for guidance scales w (per sample): diffusers' guidance embedding at its width."""
    dim = getattr(unwrap(unet).config, "time_cond_proj_dim", None)
    if dim is None:
        raise ValueError("this network is not guidance-conditioned: it takes no guidance scale as an input")
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(like.shape[0])
    return guidance_embedding(w, dim).to(like.device)


class _GuidedTimeEmbedding(TimestepEmbedding):
    """The time embedding MLP with a projection of the w embedding added to its input (diffusers' cond_proj)."""

    def forward(self, sample, condition=None):
        condition = _TIMESTEP_COND.get() if condition is None else condition
        if condition is None:
            raise ValueError("this student is guidance-conditioned: give it a guidance scale")
        return super().forward(sample, condition.to(sample.dtype))


class GuidedUNet2DModel(UNet2DModel):
    """UNet2DModel + `time_cond_proj_dim`: `forward(..., timestep_cond=guidance_embedding(w))`, as diffusers'
    UNet2DConditionModel takes it. The rest of the forward is UNet2DModel's own."""

    def __init__(self, time_cond_proj_dim: int = 256, **kwargs):
        super().__init__(**kwargs)
        plain = self.time_embedding
        self.time_embedding = _GuidedTimeEmbedding(plain.linear_1.in_features, plain.linear_2.out_features,
                                                   cond_proj_dim=time_cond_proj_dim)
        self.register_to_config(time_cond_proj_dim=time_cond_proj_dim)

    def forward(self, sample, timestep, class_labels=None, timestep_cond=None, return_dict=True):
        token = _TIMESTEP_COND.set(timestep_cond)
        try:
            return super().forward(sample, timestep, class_labels, return_dict)
        finally:
            _TIMESTEP_COND.reset(token)


# diffusers reads a model's config keys from its __init__ signature: UNet2DModel's, plus ours.
_plain = inspect.signature(UNet2DModel.__init__)
GuidedUNet2DModel.__init__.__signature__ = _plain.replace(parameters=[
    *_plain.parameters.values(),
    inspect.Parameter("time_cond_proj_dim", inspect.Parameter.KEYWORD_ONLY, default=256, annotation=int)])


def read_schedule(folder) -> Schedule:
    """The schedule a pixel model folder's scheduler_config.json names (DDPM cosine when there is none)."""
    path = Path(folder) / "scheduler_config.json"
    if not path.is_file():
        return NoiseSchedule("cosine")
    cfg = read_json_object(path)
    kind, T = cfg.get("_class_name"), cfg.get("num_train_timesteps", 1000)
    try:
        if kind == "FlowMatchEulerDiscreteScheduler":
            return FlowSchedule(shift=cfg.get("shift", 1.0), num_train_timesteps=T)
        names = {"squaredcos_cap_v2": "cosine", "linear": "linear", "scaled_linear": "scaled_linear"}
        if cfg.get("prediction_type", "v_prediction") != "v_prediction":
            raise ValueError(f"prediction type {cfg.get('prediction_type')!r}: pixel DDPM models predict v")
        return NoiseSchedule(names[cfg.get("beta_schedule", "squaredcos_cap_v2")], T)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: unsupported schedule ({type(e).__name__}: {e})") from None


def load_pixel_unet(path) -> UNet2DModel:
    """Load a diffusers UNet2DModel folder, with errors that name the file and the problem."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a diffusers model folder")
    if not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise ModelLoadError(f"{path} has no diffusion_pytorch_model.safetensors")
    try:
        config = json.loads((path / "config.json").read_text())
        cls = GuidedUNet2DModel if isinstance(config, dict) and config.get("time_cond_proj_dim") else UNet2DModel
        unet = cls.from_pretrained(path, use_safetensors=True)
    except (SafetensorError, json.JSONDecodeError, OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"could not load {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return unet.eval().requires_grad_(False)


def save_pixel_unet(unet: UNet2DModel, path, **extra_config) -> None:
    """Save as a diffusers folder (config.json + safetensors) that plain diffusers can load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path, safe_serialization=True)
    if extra_config:  # e.g. the student's timesteps, kept beside the diffusers config
        (path / "dmd2.json").write_text(json.dumps(extra_config, indent=2) + "\n")
