"""FLUX-class family: a guidance-distilled rectified-flow transformer (`FluxTransformer2DModel`) with CLIP + T5
text encoders and a 16-channel AutoencoderKL, loaded from a diffusers `FluxPipeline` folder or Hub repo.

Design (what the rest of the code sees):
- **Latent space**: the unpacked VAE latent (N, C, h, w), C = in_channels / 4 (16 for FLUX.1), h, w = the image
  size / the VAE factor (rounded down to even, as FluxPipeline.prepare_latents). Noise, add_noise, the DMD losses
  and decode stay per pixel; packing into 2x2 patch tokens, `img_ids` and `txt_ids` happen inside
  `model_output`, exactly as FluxPipeline does it (`_pack_latents`, `_prepare_latent_image_ids`, zero text ids).
- **Schedule**: `FlowSchedule(exp(mu))`: FLUX's resolution-dependent shift (the scheduler's exponential
  `time_shift(mu, 1, s)`) is SD3's shift map with shift = exp(mu), mu = `calculate_shift` of the image's token
  count with the scheduler config's base/max image_seq_len and base/max shift. A scheduler without
  `use_dynamic_shifting` (FLUX.1-schnell) uses its fixed `shift`. Network timestep = sigma (FluxPipeline passes
  `timestep / 1000`; the transformer multiplies by 1000 again inside).
- **Prediction**: "flow". FlowMatchEulerDiscreteScheduler.step is x_next = x + (s_next - s) * output; along
  x_s = (1 - s) x0 + s eps, dx/ds = eps - x0, so FLUX's output is u = eps - x0, our `Schedule.target("flow")`.
- **Guidance is an input, never a CFG pass** (FLUX.1-dev is guidance-distilled, `guidance_embeds=True`):
  `denoise(..., guidance=g)` gives g to the transformer's `guidance` input in one forward. The real score is the
  teacher at `real_guidance` = 3.5, FluxPipeline's default `guidance_scale` (also the FLUX.1-dev model card's
  example). The generator and the fake score are copies of the teacher and take a fixed `student_guidance`
  input, the same 3.5: the generator starts as the teacher sampled the way it is meant to be sampled, the fake
  score starts as the teacher at that guidance, and an exported student run in plain diffusers with
  FluxPipeline's default guidance_scale=3.5 gets the input it was trained with (public FLUX.1-dev few-step
  students, e.g. ByteDance/Hyper-SD's FLUX LoRAs and alimama-creative/FLUX.1-Turbo-Alpha, are also sampled at
  guidance_scale 3.5). Since the shared code says "guidance 1" for "no guidance" (the generator, the fake score,
  the student sampler), `denoise` at guidance 1 gives the network `student_guidance`; to sample the teacher at
  a guidance input of exactly 1, pass `guidance_input=1.0`. dmd2.json records the student's guidance input.
  A teacher without guidance embeddings (FLUX.1-schnell-like, `guidance_embeds=False`) ignores guidance.
- **Bottleneck (GAN features)**: FLUX has no mid block; "the middle" is after the first `depth // 2` of its
  `depth = num_layers + num_single_layers` blocks in forward order (double-stream `transformer_blocks`, then
  `single_transformer_blocks`): for FLUX.1 (19 + 38) the 28th block, i.e. all 19 double-stream and 9 single-
  stream blocks. The forward stops there; the image tokens (N, h/2 * w/2, D) are returned as a (N, D, h/2, w/2)
  grid (the text tokens are dropped), so the conv GAN heads work over the token grid.
- **LoRA targets**: the attention projections of both streams and the double-stream feed-forwards, the default
  `--lora_layers` of diffusers' `examples/dreambooth/train_dreambooth_lora_flux.py` (the suffixes also match the
  single-stream blocks' attn.to_q/k/v). LoRA students are written with `FluxPipeline.save_lora_weights` and
  load in plain diffusers with `FluxPipeline.load_lora_weights(folder)` (`dmd2.families.transformer_lora`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from dmd2.families.base import Family, ModelLoadError, _is_one, read_json_object, unwrap
from dmd2.families.lora import student_lora_file
from dmd2.families.sd import TextCondition, resolve_device_dtype
from dmd2.families.sd_loading import (fill_from_state_dict, first_line, load_part, load_state_dict_file, load_vaes,
                                      move_to, param_dtype)
from dmd2.hub import hub_kwargs
from dmd2.families.transformer_lora import fuse_transformer_lora, save_transformer_student
from dmd2.schedule import NUM_TRAIN_TIMESTEPS, FlowSchedule

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_GUIDANCE = 3.5          # FluxPipeline's default guidance_scale (diffusers), the FLUX.1-dev card's example
FLUX_LORA_TARGET_MODULES = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                            "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                            "ff_context.net.0.proj", "ff_context.net.2")
# FlowMatchEulerDiscreteScheduler options that change the sigmas in ways FlowSchedule does not model.
_UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal",
                          "invert_sigmas", "stochastic_sampling")


def flux_shift(scheduler_config: dict, image_seq_len: int) -> float:
    """The timestep shift FluxPipeline samples with at `image_seq_len` tokens: exp(mu) of its `calculate_shift`
    (a line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)) when the scheduler uses
    dynamic shifting, else the scheduler's fixed `shift`."""
    c = scheduler_config
    if not c.get("use_dynamic_shifting", False):
        return float(c.get("shift", 1.0))
    base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
    base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * m + (base_shift - m * base_len)
    if c.get("time_shift_type", "exponential") != "exponential":
        raise ModelLoadError(f"scheduler time_shift_type={c['time_shift_type']!r}: only FLUX's 'exponential' is supported")
    return math.exp(mu)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, h/2 * w/2, 4C) tokens of 2x2 patches, row-major, as FluxPipeline packs them."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (N, h/2 * w/2, 4C) -> (N, C, h, w)."""
    n, _, d = tokens.shape
    return tokens.reshape(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids of the (h/2) x (w/2) token grid: (0, row, column) per token, as FluxPipeline makes them."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(Family):
    """FLUX behind the `Family` interface; build it with `FluxFamily.from_pretrained(folder_or_repo)`.

    Holds the frozen parts (CLIP and T5 text encoders, tokenizers, VAE) and the transformer's config; the
    transformers themselves (teacher, students, the trainer's copies) are passed to each call."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    prediction_type = "flow"
    lora_target_modules = FLUX_LORA_TARGET_MODULES
    published: dict = {}
    real_guidance = FLUX_GUIDANCE       # the real score: the teacher at this guidance input
    default_guidance = FLUX_GUIDANCE    # sampling the teacher
    student_guidance = FLUX_GUIDANCE    # the generator's and fake score's fixed guidance input
    guidance_in_network = True          # guidance goes to the network: one forward per step, no CFG pass

    def __init__(self, source, *, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, transformer_config: dict,
                 scheduler_config: dict | None = None, device=None, dtype=None, height=None, width=None,
                 max_sequence_length: int = 512, load_kwargs: dict | None = None):
        self.source = str(source)
        self.load_kwargs = dict(load_kwargs or {})
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.vae, self.tiny_vae = vae, None
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.transformer_config = dict(transformer_config)
        self.max_sequence_length = int(max_sequence_length)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = self.transformer_config["in_channels"] // 4
        if self.transformer_config.get("patch_size", 1) != 1 or self.transformer_config["in_channels"] % 4:
            raise ModelLoadError(f"{self.source}: the transformer takes 2x2-packed latents (patch_size 1, in_channels "
                                 f"a multiple of 4); got {self.transformer_config.get('patch_size')}, "
                                 f"{self.transformer_config['in_channels']}")
        if vae.config.latent_channels != self.latent_channels:
            raise ModelLoadError(f"{self.source}: the VAE has {vae.config.latent_channels} latent channels, the "
                                 f"transformer takes {self.latent_channels} (in_channels / 4)")
        # FLUX's VAE config says its training size (1024 for FLUX.1); FluxPipeline's default is 128 x the VAE factor.
        default = int(getattr(vae.config, "sample_size", 0) or 128 * self.vae_scale_factor)
        self.height, self.width = int(height or default), int(width or default)
        multiple = 2 * self.vae_scale_factor
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"resolution {self.height}x{self.width}: must be a multiple of {multiple} for {self.source} "
                             f"(VAE factor {self.vae_scale_factor}, 2x2 patches)")
        sched = dict(scheduler_config or {})
        bad = [k for k in _UNSUPPORTED_SCHEDULER if sched.get(k)]
        if bad or sched.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS) != NUM_TRAIN_TIMESTEPS:
            raise ModelLoadError(f"{self.source}: scheduler options {bad or ['num_train_timesteps']} are not supported "
                                 f"(FLUX's FlowMatchEulerDiscreteScheduler with 1000 training timesteps is)")
        self.scheduler_config = sched
        self.schedule = FlowSchedule(flux_shift(sched, self.image_seq_len))
        self._empty: TextCondition | None = None

    @property
    def image_seq_len(self) -> int:
        """Image tokens per sample at the family's resolution (2x2 patches of the latent)."""
        _, _, h, w = self.latent_shape(1)
        return (h // 2) * (w // 2)

    @classmethod
    def from_pretrained(cls, source=FLUX_DEV, *, device=None, dtype=None, height=None, width=None,
                        max_sequence_length: int = 512, **kwargs) -> "FluxFamily":
        """Text encoders, tokenizers and VAE of a FluxPipeline folder or Hub repo, in `dtype` on `device` (default
        fp16 on CUDA, fp32 on CPU; FLUX is usually run in bf16: dtype="bf16"). `height`/`width`: the image size
        (default: the VAE's sample_size, 1024 for FLUX.1), which also sets the timestep shift. kwargs go to every
        from_pretrained (revision, local_files_only, cache_dir, ...)."""
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        device, dtype = resolve_device_dtype(device, dtype)
        transformer_config, sched = load_flux_configs(source, **hub_kwargs(kwargs))
        te = load_part(CLIPTextModel, source, subfolder="text_encoder", dtype=dtype, **kwargs)
        te2 = load_part(T5EncoderModel, source, subfolder="text_encoder_2", dtype=dtype, **kwargs)
        tok = load_part(CLIPTokenizer, source, subfolder="tokenizer", **hub_kwargs(kwargs))
        tok2 = load_part(T5TokenizerFast, source, subfolder="tokenizer_2", **hub_kwargs(kwargs))
        vae, _ = load_vaes(source, device, dtype, **hub_kwargs(kwargs))
        return cls(source, vae=vae, text_encoder=te.to(device).eval().requires_grad_(False),
                   text_encoder_2=te2.to(device).eval().requires_grad_(False), tokenizer=tok, tokenizer_2=tok2,
                   transformer_config=transformer_config, scheduler_config=sched, device=device, dtype=dtype,
                   height=height, width=width, max_sequence_length=max_sequence_length, load_kwargs=kwargs)

    # --- data space -----------------------------------------------------------------------
    def latent_shape(self, n: int) -> tuple[int, ...]:
        f = 2 * self.vae_scale_factor
        return (n, self.latent_channels, 2 * (self.height // f), 2 * (self.width // f))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> (z - shift_factor) * scaling_factor, a sample of the VAE posterior."""
        vae = self.vae
        z = vae.encode(images.to(self.device, param_dtype(vae))).latent_dist.sample(generator)
        return (z.float() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        """Latents -> images in [-1, 1] (x / scaling_factor + shift_factor, as FluxPipeline), `chunk` at a time."""
        vae = self.vae
        out = []
        for part in x.split(max(1, chunk)):
            z = part.to(self.device, param_dtype(vae)) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
            out.append(vae.decode(z).sample.float().clamp(-1, 1))
        return torch.cat(out)

    # --- conditioning -----------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, prompts) -> TextCondition:
        """Prompts -> FluxPipeline.encode_prompt's outputs: prompt_embeds (T5's last hidden state over
        max_sequence_length tokens) and pooled_prompt_embeds (CLIP's pooled output over its 77 tokens)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tok, tok2 = self.tokenizer, self.tokenizer_2
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        pooled = self.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.text_encoder.dtype)
        ids2 = tok2(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids.to(self.device)
        embeds = self.text_encoder_2(ids2, output_hidden_states=False)[0].to(self.text_encoder_2.dtype)
        return TextCondition(prompt_embeds=embeds, pooled_prompt_embeds=pooled)

    def null_condition(self, n: int) -> TextCondition:
        """The empty prompt's embeddings (FLUX takes no CFG pass; this is the unconditional input all the same)."""
        if self._empty is None:
            self._empty = self.condition([""])
        return TextCondition({k: v.expand(n, *v.shape[1:]) for k, v in self._empty.items()})

    def cat_conditions(self, a: TextCondition, b: TextCondition) -> TextCondition:
        return TextCondition({k: torch.cat([a[k], b[k].to(a[k].device)]) for k in a})

    # --- networks ---------------------------------------------------------------------------
    def _inputs(self, transformer, x_t, t, cond, guidance_input) -> dict:
        """The transformer's keyword inputs as FluxPipeline builds them, for latents x_t at schedule timesteps t."""
        net = unwrap(transformer)
        dtype = param_dtype(net)
        n, _, h, w = x_t.shape
        t = self.schedule.timesteps(t, n, x_t.device)
        # FluxPipeline: timestep = (sigma * 1000 in the latents' dtype) / 1000; the transformer multiplies by 1000.
        timestep = self.schedule.model_timestep(t).to(x_t.device, dtype) / 1000
        guidance = None
        if net.config.guidance_embeds:
            g = self.student_guidance if guidance_input is None else guidance_input
            guidance = torch.as_tensor(g, dtype=torch.float32, device=x_t.device).reshape(-1).expand(n)
        embeds = cond["prompt_embeds"].to(x_t.device, dtype)
        return dict(hidden_states=pack(x_t.to(dtype)), timestep=timestep, guidance=guidance,
                    pooled_projections=cond["pooled_prompt_embeds"].to(x_t.device, dtype),
                    encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=dtype),
                    img_ids=image_ids(h, w, x_t.device, dtype))

    def model_output(self, unet, x_t, t, cond, guidance_input=None):
        """The transformer's velocity u = eps - x0, unpacked to (N, C, h, w); `guidance_input`: its guidance
        input (a number or one per sample; default `student_guidance`), ignored without guidance embeddings."""
        h, w = x_t.shape[-2:]
        out = unet(**self._inputs(unet, x_t, t, cond, guidance_input), return_dict=False)[0]
        return unpack(out, h, w)

    def denoise(self, unet, x_t, t, cond, guidance=1.0, guidance_input=None):
        """x0 estimate in one forward: the guidance scale (a number or one per sample) is the transformer's
        `guidance` input, never a CFG pass; guidance 1 means the family's `student_guidance` (module docstring)."""
        if not _is_one(guidance):
            if guidance_input is not None:
                raise ValueError("give FLUX's guidance once: as guidance or as guidance_input, not both")
            guidance_input = guidance
        t = self.schedule.timesteps(t, x_t.shape[0], x_t.device)
        out = self.model_output(unet, x_t, t, cond, guidance_input=guidance_input)
        return self.schedule.to_x0(x_t, out, t, self.prediction_type)

    def bottleneck_depth(self, transformer=None) -> int:
        """How many blocks (double-stream first, then single-stream) run before the bottleneck: half of them."""
        c = self.transformer_config
        return (c["num_layers"] + c["num_single_layers"]) // 2

    def bottleneck(self, unet, x_t, t, cond, guidance_input=None):
        """FluxTransformer2DModel.forward (diffusers 0.42) up to the middle of its blocks (`bottleneck_depth`); the
        image tokens there as a (N, D, h/2, w/2) grid. The later blocks and the output projection never run."""
        net = unwrap(unet)
        inp = self._inputs(net, x_t, t, cond, guidance_input)
        hidden = net.x_embedder(inp["hidden_states"])
        timestep = inp["timestep"].to(hidden.dtype) * 1000
        pooled = inp["pooled_projections"]
        if inp["guidance"] is None:
            temb = net.time_text_embed(timestep, pooled)
        else:
            temb = net.time_text_embed(timestep, inp["guidance"].to(hidden.dtype) * 1000, pooled)
        context = net.context_embedder(inp["encoder_hidden_states"])
        rotary = net.pos_embed(torch.cat((inp["txt_ids"], inp["img_ids"]), dim=0))
        blocks = list(net.transformer_blocks) + list(net.single_transformer_blocks)
        for block in blocks[:self.bottleneck_depth(net)]:
            if torch.is_grad_enabled() and net.gradient_checkpointing:
                context, hidden = net._gradient_checkpointing_func(block, hidden, context, temb, rotary, None)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                        image_rotary_emb=rotary)
        n, _, h, w = x_t.shape
        return hidden.reshape(n, h // 2, w // 2, hidden.shape[-1]).permute(0, 3, 1, 2)

    def bottleneck_channels(self, unet=None) -> int:
        c = self.transformer_config
        return c["num_attention_heads"] * c["attention_head_dim"]

    def bottleneck_size(self, unet=None) -> int:
        """The shorter side of the token grid at the family's resolution."""
        return min(self.latent_shape(1)[-2:]) // 2

    # --- weights ----------------------------------------------------------------------------
    def _ready(self, transformer: nn.Module) -> nn.Module:
        return move_to(transformer, self.device, self.dtype).eval().requires_grad_(False)

    @classmethod
    def for_training(cls, teacher, *, device=None, frozen_dtype=torch.float32, resolution=None):
        """Text encoders and VAE in `frozen_dtype`, the teacher transformer in fp32 (the trainer copies it into the
        generator and the fake score, which train in fp32 master weights)."""
        from diffusers import FluxTransformer2DModel

        family = cls.from_pretrained(teacher, device=device, dtype=frozen_dtype, height=resolution, width=resolution)
        net = load_part(FluxTransformer2DModel, teacher, subfolder="transformer", dtype=torch.float32,
                        **family.load_kwargs)
        return family, net.to(family.device).eval().requires_grad_(False)

    def load_teacher(self, path=None, **kwargs) -> nn.Module:
        """The teacher transformer of a FluxPipeline folder or Hub repo (default: the family's source)."""
        from diffusers import FluxTransformer2DModel

        kwargs = {**self.load_kwargs, **kwargs} if path is None else kwargs
        return self._ready(load_part(FluxTransformer2DModel, path or self.source, subfolder="transformer",
                                     dtype=self.dtype, **kwargs))

    def new_transformer(self) -> nn.Module:
        """An uninitialised transformer with the teacher's config, on the meta device."""
        from accelerate import init_empty_weights
        from diffusers import FluxTransformer2DModel

        with init_empty_weights(include_buffers=False):
            return FluxTransformer2DModel.from_config(self.transformer_config)

    def transformer_from_state_dict(self, state_dict: dict, what: str = "state dict") -> nn.Module:
        """A transformer with the teacher's config and exactly these weights (every key must match)."""
        return self._ready(fill_from_state_dict(self.new_transformer(), state_dict, self.dtype, what,
                                                f"the FLUX transformer of {self.source}"))

    def load_student(self, path, lora_scale: float = 1.0, **kwargs) -> nn.Module:
        """A student transformer from: a student folder of our runs (`save_student`: a diffusers
        FluxTransformer2DModel folder, or a LoRA folder), a full transformer state dict (.safetensors, or .bin read
        with weights_only=True), or a LoRA file (fused into the teacher)."""
        from diffusers import FluxTransformer2DModel

        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"FLUX student not found: {path}")
        folder = path if path.is_dir() else path.parent
        self._check_meta(folder / "dmd2.json")
        if path.is_dir() and (path / "config.json").is_file():
            kind = read_json_object(path / "config.json").get("_class_name")
            if kind != "FluxTransformer2DModel":
                raise ModelLoadError(f"{path} holds a {kind}, not a FluxTransformer2DModel (a student of another family?)")
            return self._ready(load_part(FluxTransformer2DModel, path, dtype=self.dtype))
        if path.is_dir():
            path = student_lora_file(path)  # a LoRA student folder (save_student)
        state_dict = load_state_dict_file(path)
        if any("lora" in k for k in state_dict):
            teacher = self.load_teacher()
            fuse_transformer_lora(teacher, path, self.pipeline_class, scale=lora_scale)
            return teacher
        return self.transformer_from_state_dict(state_dict, what=str(path))

    def _check_meta(self, meta_path: Path) -> None:
        """A student's dmd2.json, when there is one, must be a FLUX student trained at this family's guidance input."""
        if not meta_path.is_file():
            return
        meta = read_json_object(meta_path)
        if meta.get("family", self.name) != self.name:
            raise ModelLoadError(f"{meta_path}: a {meta['family']} student, not a FLUX one")
        g = meta.get("student_guidance")
        if g is not None and float(g) != self.student_guidance:
            raise ModelLoadError(f"{meta_path}: the student was trained at guidance input {g}, this family feeds "
                                 f"{self.student_guidance}")

    def save_student(self, unet, path, **extra) -> None:
        """A diffusers FluxTransformer2DModel folder (loads in plain diffusers), or for a transformer with a PEFT
        LoRA adapter only the LoRA (`pytorch_lora_weights.safetensors`, FluxPipeline.load_lora_weights(folder));
        and dmd2.json with `extra` (timesteps, schedule, ...), the family, teacher and guidance input."""
        guidance = self.student_guidance if unwrap(unet).config.guidance_embeds else None
        save_transformer_student(unet, path, self.pipeline_class,
                                 {"family": self.name, "teacher": self.source, "student_guidance": guidance, **extra})

    def student_sigmas(self, timesteps) -> list[float]:
        """The unshifted sigmas (t + 1) / T of student timesteps: FluxPipeline's `sigmas=` argument, which its
        scheduler then shifts (999, 749, 499, 249 -> 1, 0.75, 0.5, 0.25: its own default for 4 steps)."""
        return [(int(t) + 1) / self.schedule.num_train_timesteps for t in timesteps]

    def card_usage(self, teacher: str, timesteps, lora: bool = False) -> list[str]:
        """The model card's plain-diffusers recipe. FlowMatchEulerDiscreteScheduler with stochastic_sampling steps
        x0 = x - sigma u, then re-noises to the next sigma with fresh noise: `student_sample`; a fixed shift equal to
        ours (instead of the dynamic one) keeps the sigmas right at any resolution and for a run's own flow_shift."""
        load = ("pipe.load_lora_weights('student')  # this folder" if lora else
                "pipe.transformer = FluxTransformer2DModel.from_pretrained('student')  # this folder")
        return ["Use in plain diffusers (denoise, re-noise with fresh noise at the student's sigmas; the guidance "
                "scale is the transformer's input, no CFG):", "",
                "```python",
                f"from diffusers import {self.pipeline_class}, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel",
                f"pipe = {self.pipeline_class}.from_pretrained('{teacher}')", load,
                "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                f"use_dynamic_shifting=False, shift={self.schedule.shift!r}, stochastic_sampling=True)",
                f"image = pipe('a photo of a cat', sigmas={self.student_sigmas(timesteps)}, "
                f"guidance_scale={self.student_guidance:g}, height={self.height}, width={self.width}).images[0]",
                "```"]

    def timesteps_of(self, student) -> tuple[int, ...]:
        """The sampling timesteps of a student folder with dmd2.json."""
        meta = Path(student) / "dmd2.json"
        if not meta.is_file():
            raise ModelLoadError(f"{student} is not a folder with dmd2.json naming its timesteps")
        return tuple(int(t) for t in read_json_object(meta)["timesteps"])


def load_flux_configs(source, **kwargs) -> tuple[dict, dict]:
    """The transformer's config (required, a FluxTransformer2DModel) and the scheduler's of a FluxPipeline folder or
    Hub repo; a local folder of another pipeline fails naming its class."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    index = Path(str(source)) / "model_index.json"
    if Path(str(source)).is_dir() and index.is_file():
        kind = read_json_object(index).get("_class_name")
        if kind != "FluxPipeline":
            raise ModelLoadError(f"{source} is a {kind} folder, not a FluxPipeline (use its own family)")
    try:
        config = dict(FluxTransformer2DModel.load_config(source, subfolder="transformer", **kwargs))
    except Exception as e:
        raise ModelLoadError(f"{source} has no readable transformer/config.json (not a FluxPipeline?): "
                             f"{first_line(e)}") from None
    if config.get("_class_name") != "FluxTransformer2DModel":
        raise ModelLoadError(f"{source}: the transformer is a {config.get('_class_name')}, not a FluxTransformer2DModel")
    try:
        sched = dict(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", **kwargs))
    except Exception as e:
        raise ModelLoadError(f"{source} has no readable scheduler/scheduler_config.json: {first_line(e)}") from None
    return config, sched
