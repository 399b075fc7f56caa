"""Named generators (the teacher, students, local runs): where they live, how they sample, a cache.

Two kinds of conditioning: class labels (the pixel family, the embedded MNIST models) and text
prompts (SDXL and SD1.5: the teacher pipeline, DMD2's published students, our own runs).
Text models of the same base share one family object, so the text encoders and the VAE are
loaded once however many students sit beside their teacher.
Hub-backed names are "available" only when their files are already in the local Hugging Face
cache; nothing here touches the network at import or in `available()`.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmd2.families import family_class
from dmd2.families.base import Family, ModelLoadError, read_json_object
from dmd2.families.lora import student_lora_file
from dmd2.families.pixel import PixelFamily, load_pixel_unet
from dmd2.families.sdxl import PUBLISHED as SDXL_PUBLISHED
from dmd2.families.sdxl import SDXL_BASE
from dmd2.families.sd3 import SD3_MEDIUM
from dmd2.guidance import check_guidance
from dmd2.hub import cached_file, hub_reachable, is_repo_id
from dmd2.images import to_uint8
from dmd2.prompts import check_prompt
from dmd2.sampling import (check_renoise, ddim_sample, ddim_until, handover_timesteps, initial_noise, renoise_seed,
                           student_sample)
from dmd2.schedule import FlowSchedule

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class ModelSpec:
    """What a named generator is: a teacher sampled by DDIM+CFG, or a few-step student."""

    name: str
    path: Path | None                  # pixel: the model folder; text: the student's UNet folder or weight file
    kind: str                          # "teacher" or "student"
    family: str = "pixel"              # "pixel", "sdxl", "sd15", "sd3" or "flux"
    steps: int = 50                    # teacher default DDIM steps
    guidance: float | None = None      # teacher CFG scale; None = the family's default
    timesteps: tuple[int, ...] = ()    # student timesteps (read from dmd2.json when empty)
    description: str = ""
    base: str | None = None            # text families: the teacher pipeline (Hub repo or folder) giving text encoders + VAE
    weights: str | None = None         # text students: a published name (e.g. "dmd2-sdxl-4step") or a file / folder
    demo: bool = True                  # in the default app (`build_app()` with no models); others by name

    @property
    def conditioning(self) -> str:
        """"class" (labels) for the pixel family, "text" (prompts) for SDXL and SD1.5."""
        return "class" if self.family == "pixel" else "text"


TEXT_FAMILIES = ("sdxl", "sd15", "sd3", "flux")
PIPELINE_FAMILIES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd15",
                     "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


def _published(name: str, description: str) -> ModelSpec:
    p = SDXL_PUBLISHED[name]
    return ModelSpec(name, None, "student", "sdxl", timesteps=p.timesteps, base=SDXL_BASE, weights=name,
                     description=description)


BUILTIN = {
    "mnist-teacher": ModelSpec("mnist-teacher", ASSETS / "mnist" / "teacher", "teacher",
                               description="MNIST teacher, DDIM 50 steps with CFG"),
    "mnist-dmd2-1step": ModelSpec("mnist-dmd2-1step", ASSETS / "mnist" / "dmd2-1step", "student",
                                  description="DMD2 1-step student of the MNIST teacher"),
    "mnist-dmd2-2step": ModelSpec("mnist-dmd2-2step", ASSETS / "mnist" / "dmd2-2step", "student",
                                  description="DMD2 2-step student of the MNIST teacher (t = 999, 749)"),
    "mnist-dmd2-4step-last": ModelSpec("mnist-dmd2-4step-last", ASSETS / "mnist" / "dmd2-4step-last", "student",
                                       description="DMD2 4-step student of the MNIST teacher, its last step trained"),
    # The 4-step preset trained with DDIM moves between its steps and the real score at CFG w = 0.8 below t = 500
    # (configs/steps/mnist-4step-ddim-w08-low.yaml, seed 0): a higher recall than the preset's student at a lower
    # precision; by name, not in the default app. Its dmd2.json makes every sampler move by DDIM.
    "mnist-dmd2-4step-ddim": ModelSpec("mnist-dmd2-4step-ddim", ASSETS / "mnist" / "dmd2-4step-ddim", "student",
                                       description="DMD2 4-step student of the MNIST teacher, DDIM moves between "
                                                   "steps (higher recall)", demo=False),
    # The four-stage 4-step student the README's results had before mnist-dmd2-4step-last beat it on 9 of 14
    # measures: by name (`python app.py --model mnist-dmd2-4step ...`), not in the default app.
    "mnist-dmd2-4step": ModelSpec("mnist-dmd2-4step", ASSETS / "mnist" / "dmd2-4step", "student",
                                  description="DMD2 4-step student of the MNIST teacher (four-stage recipe)",
                                  demo=False),
    "mnist-dmd2-1step-guided": ModelSpec("mnist-dmd2-1step-guided", ASSETS / "mnist" / "dmd2-1step-guided", "student",
                                         description="guidance-conditioned DMD2 1-step student: any w in [1, 3]"),
    # The rectified-flow teacher and its students: by name (`python app.py --model mnist-flow-teacher ...`), not in
    # the default app, whose Compare and Arena would otherwise run a second 50-step teacher per request.
    "mnist-flow-teacher": ModelSpec("mnist-flow-teacher", ASSETS / "mnist" / "flow-teacher", "teacher",
                                    description="MNIST rectified-flow teacher, Euler 50 steps", demo=False),
    "mnist-flow-dmd2-1step": ModelSpec("mnist-flow-dmd2-1step", ASSETS / "mnist" / "flow-dmd2-1step", "student",
                                       description="DMD2 1-step student of the MNIST flow teacher", demo=False),
    "mnist-flow-dmd2-4step": ModelSpec("mnist-flow-dmd2-4step", ASSETS / "mnist" / "flow-dmd2-4step", "student",
                                       description="DMD2 4-step student of the MNIST flow teacher", demo=False),
    "sdxl-teacher": ModelSpec("sdxl-teacher", None, "teacher", "sdxl", steps=50, base=SDXL_BASE,
                              description="SDXL base 1.0, DDIM 50 steps with CFG 5 (needs a GPU)"),
    "sd3-medium-teacher": ModelSpec("sd3-medium-teacher", None, "teacher", "sd3", steps=28, base=SD3_MEDIUM,
                                    description="Stable Diffusion 3 medium, Euler 28 steps with CFG 7 (gated on the "
                                                "Hub; needs a GPU)"),
    "dmd2-sdxl-4step": _published("dmd2-sdxl-4step", "DMD2's published 4-step SDXL student (tianweiy/DMD2)"),
    "dmd2-sdxl-1step": _published("dmd2-sdxl-1step", "DMD2's published 1-step SDXL student (tianweiy/DMD2)"),
    "dmd2-sdxl-4step-lora": _published("dmd2-sdxl-4step-lora",
                                       "DMD2's published 4-step SDXL LoRA (tianweiy/DMD2), fused into SDXL base"),
}


@dataclass
class Generated:
    """A batch of samples and what it cost."""

    images: np.ndarray          # uint8, N x H x W x C
    labels: np.ndarray | None   # int64, N (class models; None for text models)
    nfe: int                    # network evaluations per image (CFG counts 2 per step)
    seconds: float              # wall time of the whole batch
    extra: dict = field(default_factory=dict)
    prompts: list[str] | None = None   # text models: the prompt of each image


class LoadedModel:
    """A generator ready to sample: family + UNet + how to sample it."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        if spec.family == "pixel":
            # channels_last: about 1.5x faster convolutions on CPU (benchmarks/sampling.py)
            self.unet = load_pixel_unet(spec.path).to(memory_format=torch.channels_last)
            self.family: Family = PixelFamily.from_unet(self.unet, spec.path)
        elif spec.family in TEXT_FAMILIES:
            base, weights = _hub_sources(spec)
            self.family = text_family(spec.family, base)
            self.unet = self.family.load_teacher() if spec.kind == "teacher" else self.family.load_student(weights)
        else:
            raise ModelLoadError(f"model {spec.name!r}: unknown family {spec.family!r} "
                                 f"(known: pixel, {', '.join(TEXT_FAMILIES)})")
        timesteps, meta = spec.timesteps, {}
        # dmd2.json sits in the student's folder: spec.path itself, or the folder of a student's weight file.
        folder = spec.path if spec.path is None or spec.path.is_dir() else spec.path.parent
        meta_path = folder / "dmd2.json" if spec.kind == "student" and folder is not None else None
        if meta_path is not None and meta_path.is_file():
            meta = read_json_object(meta_path)
        if spec.kind == "student" and not timesteps:
            if "timesteps" not in meta:
                raise ModelLoadError(f"student {spec.name!r} has no {meta_path} naming its timesteps")
            timesteps = tuple(meta["timesteps"])
        self.timesteps = tuple(int(t) for t in timesteps)
        self._teacher_name = meta.get("teacher") if spec.family == "pixel" else None
        self._folder = folder
        self._handover_teacher: LoadedModel | None = None
        self._handover_failure: ModelLoadError | None = None    # why it did not load: not retried on every call
        self.family = _with_flow_shift(self.family, meta.get("flow_shift"), meta_path)
        # A guidance-conditioned student: the range of w it was trained on, and the w it samples at by default.
        self.guidance_range, self.guidance_default = _guidance_meta(meta, meta_path)
        # How a multi-step student moves between its steps ("fresh": DMD2's re-noising; "ddim"): as it was trained.
        try:
            self.renoise = check_renoise(meta.get("renoise", "fresh"))
        except ValueError as e:
            raise ModelLoadError(f"student {spec.name!r}: {meta_path}: {e}") from None
        if self.renoise != "fresh" and spec.family != "pixel":
            raise ModelLoadError(f"student {spec.name!r}: {meta_path} names renoise {self.renoise!r}, which is built "
                                 f"for pixel students only (a {spec.family} student samples with fresh re-noising)")
        if (self.guidance_range is None) != (getattr(self.unet.config, "time_cond_proj_dim", None) is None):
            raise ModelLoadError(f"student {spec.name!r}: its network and {meta_path} disagree on whether it takes a "
                                 f"guidance scale as an input (time_cond_proj_dim vs guidance_range)")

    @property
    def conditioning(self) -> str:
        """"class" (generate takes labels) or "text" (generate takes prompts)."""
        return self.spec.conditioning

    @property
    def num_classes(self) -> int | None:
        """Class models: the number of classes; text models: None."""
        return self.family.num_classes if self.conditioning == "class" else None

    def default_steps(self) -> int:
        return self.spec.steps if self.spec.kind == "teacher" else len(self.timesteps)

    def check_prompt(self, prompt) -> str:
        """The cleaned prompt, or ValueError if it is empty, too long, or more tokens than the text encoder reads."""
        return check_prompt(prompt, getattr(self.family, "tokenizer", None))

    @property
    def guided(self) -> bool:
        """Does this student take the guidance scale as an input (a guidance-conditioned student)?"""
        return self.guidance_range is not None

    def teacher_guidance(self, guidance: float | None = None) -> float:
        """A teacher's CFG scale: `guidance`, else its spec's, else its family's default."""
        g = self.spec.guidance if guidance is None else guidance
        return self.family.default_guidance if g is None else float(g)

    def teacher_nfe(self, steps: int, guidance: float) -> int:
        """Network evaluations of `steps` teacher steps: CFG doubles them, unless guidance is a network input (FLUX)."""
        return steps * (1 if guidance == 1.0 or getattr(self.family, "guidance_in_network", False) else 2)

    def handover_teacher(self) -> "LoadedModel":
        """The teacher a hybrid sample (`generate(teacher_until=...)`) starts with: this student's own, i.e. the
        folder its dmd2.json names (pixel students) or its base pipeline's UNet (text students). Loaded once; a
        failure is remembered and raised again (a large base is not re-read on every request)."""
        if self._handover_failure is not None:
            raise self._handover_failure
        if self._handover_teacher is None:
            try:
                self._handover_teacher = self._find_handover_teacher()
            except ModelLoadError as e:
                self._handover_failure = e
                raise
            except Exception as e:
                self._handover_failure = ModelLoadError(f"student {self.spec.name!r}: its teacher does not load: {e}")
                raise self._handover_failure from None
        return self._handover_teacher

    def _find_handover_teacher(self) -> "LoadedModel":
        """`handover_teacher`'s lookup: the folder dmd2.json names, or the base's teacher; checked (a teacher,
        the same noise schedule)."""
        if self.spec.family == "pixel":
            if not self._teacher_name:
                raise ModelLoadError(f"student {self.spec.name!r}: its dmd2.json names no 'teacher' to hand over from")
            path = _resolve_base(str(self._teacher_name), self._folder)
            if not Path(path).exists() and (ASSETS.parent / path).exists():   # a repo-relative path, from elsewhere
                path = str(ASSETS.parent / path)
            try:
                teacher = load(path)
            except Exception as e:
                raise ModelLoadError(f"student {self.spec.name!r}: the teacher its dmd2.json names "
                                     f"({self._teacher_name!r}) does not load: {e}") from None
        else:   # the base pipeline's UNet: the built-in teacher of this base where there is one (SD3: its 28
            # steps), else one per base; either way loaded once, shared by every student of that base
            builtin = next((name for name, b in BUILTIN.items() if b.kind == "teacher"
                            and b.family == self.spec.family and b.base == self.spec.base), None)
            teacher = load(builtin) if builtin else _base_teacher(self.spec.family, self.spec.base)
        if teacher.spec.kind != "teacher":
            raise ModelLoadError(f"student {self.spec.name!r}: its teacher {teacher.spec.name!r} is not a teacher")
        mine, theirs = self.family.schedule, teacher.family.schedule
        probe = torch.tensor(self.timesteps[1:] if len(self.timesteps) > 1 else self.timesteps)
        if type(mine) is not type(theirs) or not all(torch.allclose(a, b) for a, b in
                                                     zip(mine.alpha_sigma(probe), theirs.alpha_sigma(probe))):
            raise ModelLoadError(f"student {self.spec.name!r} samples on another noise schedule than its teacher "
                                 f"{teacher.spec.name!r}: a handover needs both on one schedule")
        return teacher

    def check_handover(self, teacher_until) -> int:
        """The index of the student timestep `teacher_until` hands over to (ValueError naming the problem)."""
        if self.spec.kind != "student":
            raise ValueError(f"teacher_until: {self.spec.name!r} is a teacher; a handover is teacher first, then a student")
        if len(self.timesteps) < 2:
            raise ValueError(f"teacher_until: {self.spec.name!r} is a 1-step student, so no later step can take over "
                             f"from the teacher")
        later = list(self.timesteps[1:])
        if teacher_until not in later:
            raise ValueError(f"teacher_until must be one of {self.spec.name!r}'s later timesteps "
                             f"({', '.join(map(str, later))}), got {teacher_until}")
        return list(self.timesteps).index(teacher_until)

    def generate(self, labels=None, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                 autocast: bool = False, callback=None, prompts=None, step_images: bool = False,
                 teacher_until: int | None = None, teacher_steps: int | None = None,
                 teacher_guidance: float | None = None, renoise: str | None = None) -> Generated:
        """Sample one image per label (class models) or per prompt (text models) from `seed`
        (same seed, same starting noise for every model of a family). For text models the prompts
        may come as `prompts=` or in place of the labels. `step_images` (students): also return each
        step's decoded x0 estimate in `extra["step_images"]` (the last one is `images`). `guidance`: the
        teacher's CFG scale, or a guidance-conditioned student's w (within its range; default: its own);
        plain students ignore it. `teacher_until` (multi-step students): a hybrid sample; the student's teacher
        (`handover_teacher`) runs its own DDIM trajectory, on its `teacher_steps`-step grid (default: its usual
        steps) at its own guidance (or `teacher_guidance`), from the starting noise down to that timestep, one of
        the student's later ones, and the student finishes from there with its remaining steps. `renoise`
        (students): "fresh" or "ddim", how a multi-step student moves between steps (default: its own,
        `self.renoise`, from dmd2.json); recorded in `extra` when it is not "fresh"."""
        handover = None
        if renoise is not None:
            if self.spec.kind == "teacher":
                raise ValueError(f"renoise: only for students; {self.spec.name!r} is a teacher (DDIM)")
            renoise = check_renoise(renoise)
            if renoise != "fresh" and self.spec.family != "pixel":
                raise ValueError(f"renoise {renoise!r}: built for pixel students only; {self.spec.name!r} is a "
                                 f"{self.spec.family} student")
        if teacher_until is None and teacher_steps is not None:
            raise ValueError("teacher_steps: only with teacher_until (the teacher's grid on its way down to it)")
        if teacher_until is None and teacher_guidance is not None:
            raise ValueError("teacher_guidance: only with teacher_until (the teacher's CFG scale on its way down to it)")
        if teacher_until is not None:
            handover = self.check_handover(teacher_until)
            if step_images:
                raise ValueError("step_images: not with teacher_until (the teacher's part has no student steps)")
            if teacher_steps is not None and int(teacher_steps) < 1:
                raise ValueError(f"teacher_steps must be at least 1, got {teacher_steps}")
        if self.conditioning == "text":
            prompts = labels if prompts is None else prompts
            prompts = [prompts] if isinstance(prompts, str) else list(prompts if prompts is not None else [])
            if not prompts:
                raise ValueError(f"model {self.spec.name!r} is a text-to-image model: give it prompts")
            labels = None
            cond = self.family.condition(prompts)
            n = len(prompts)
        else:
            if prompts is not None:
                raise ValueError(f"model {self.spec.name!r} is class-conditional: give it labels, not prompts")
            labels = np.asarray(labels, dtype=np.int64)
            cond = self.family.condition(labels)
            n = len(labels)
        device = getattr(self.family, "device", "cpu")
        noise = initial_noise(self.family, n, seed, device=device)
        start = time.perf_counter()
        if self.spec.kind == "teacher":
            steps = self.spec.steps if steps is None else int(steps)
            if steps < 1:
                raise ValueError(f"steps must be at least 1, got {steps}")
            g = self.teacher_guidance(guidance)
            x = ddim_sample(self.family, self.unet, cond, noise, steps, g, autocast, callback)
            nfe = self.teacher_nfe(steps, g)
            extra = {"guidance": g, "steps": steps}
        else:
            steps_x0 = []
            w = None
            if self.guided:
                w = check_guidance(self.guidance_default if guidance is None else guidance, self.guidance_range,
                                   f"student {self.spec.name!r}")
            timesteps, extra = list(self.timesteps), {}
            if handover is not None:
                teacher = self.handover_teacher()
                grid = teacher.spec.steps if teacher_steps is None else int(teacher_steps)
                g = teacher.teacher_guidance(teacher_guidance)
                t_cond = cond if teacher.family is self.family else teacher.family.condition(
                    prompts if self.conditioning == "text" else labels)
                noise = ddim_until(teacher.family, teacher.unet, t_cond, noise, teacher_until, grid, g, autocast)
                evals = len(handover_timesteps(teacher.family.schedule, teacher_until, grid))
                timesteps = timesteps[handover:]
                extra = {"teacher_until": teacher_until, "teacher_evals": evals, "teacher_grid": grid,
                         "teacher_guidance": g, "teacher_nfe": teacher.teacher_nfe(evals, g)}
            renoise = self.renoise if renoise is None else renoise
            x = student_sample(self.family, self.unet, cond, noise, timesteps, seed=renoise_seed(seed),
                               autocast=autocast,
                               on_step=(lambda i, t, x0: steps_x0.append(x0)) if step_images else None,
                               guidance_input=w, renoise=renoise)
            nfe = len(timesteps) + extra.get("teacher_nfe", 0)
            extra = {"timesteps": timesteps, "steps": len(timesteps), **extra}
            if renoise != "fresh" and len(timesteps) > 1:   # recorded where a move between steps took place
                extra["renoise"] = renoise
            if w is not None:
                extra["guidance"] = w
            if step_images:
                extra["step_images"] = [to_uint8(self.family.decode(x0)) for x0 in steps_x0]
        images = to_uint8(self.family.decode(x))
        return Generated(images, labels, nfe, time.perf_counter() - start, extra, prompts)


_cache: dict[str, LoadedModel] = {}
_base_teachers: dict[tuple[str, str], LoadedModel] = {}   # (family, base) -> a text student's handover teacher
_base_teacher_lock = threading.Lock()
_failures: dict[str, str] = {}       # name -> why it did not load
_lock = threading.Lock()
_families: dict[tuple[str, str], Family] = {}
_family_lock = threading.Lock()


def _base_teacher(family: str, base: str) -> LoadedModel:
    """The teacher of a text student whose base pipeline no built-in teacher names: that pipeline's UNet at 50
    steps, loaded once per base (the students of one base share it)."""
    with _base_teacher_lock:
        key = (family, str(base))
        if key not in _base_teachers:
            _base_teachers[key] = LoadedModel(ModelSpec(f"{base} (teacher)", None, "teacher", family, steps=50,
                                                        base=base, description="handover teacher"))
        return _base_teachers[key]


def text_family(family: str, base: str) -> Family:
    """The SDXL / SD1.5 family (text encoders, tokenizers, VAE) of `base`, loaded once and shared."""
    key = (family, str(base))
    with _family_lock:
        if key not in _families:
            if family not in TEXT_FAMILIES:
                raise ModelLoadError(f"{family!r} is not a text-to-image family (known: {', '.join(TEXT_FAMILIES)})")
            cls = family_class(family)
            _families[key] = cls.from_pretrained(base)
        return _families[key]


def _hub_needs(spec: ModelSpec) -> list[tuple[str, str]]:
    """(repo, file) pairs a text model needs from the Hub (beyond what local folders provide)."""
    needs = []
    if spec.base is not None and is_repo_id(spec.base):
        needs.append((spec.base, "model_index.json"))
    if spec.kind == "student" and spec.weights in SDXL_PUBLISHED:
        p = SDXL_PUBLISHED[spec.weights]
        needs.append((p.repo, p.filename))
    return needs


def _hub_sources(spec: ModelSpec) -> tuple[str | None, str | None]:
    """(base, weights) to load from. Hub files that are neither cached nor downloadable (offline) fail at
    once, saying what to do; with the Hub unreachable but everything cached, the cached paths are used,
    so no loader waits for network retries."""
    needs = _hub_needs(spec)
    if not needs:
        return spec.base, spec.weights
    cached = {need: cached_file(*need) for need in needs}
    missing = [need for need, path in cached.items() if path is None]
    if not hub_reachable():
        if missing:
            what = ", ".join(f"{repo}/{f}" if f != "model_index.json" else repo for repo, f in missing)
            how = " and ".join(f"`hf download {repo}" + ("`" if f == "model_index.json" else f" {f}`")
                               for repo, f in missing)
            size = ("SDXL wants a GPU (about 7 GB of fp16 weights per UNet; a CPU takes minutes per image)"
                    if spec.family == "sdxl" else
                    f"{spec.family} wants a GPU (billions of parameters; a CPU takes minutes per image)")
            raise ModelLoadError(
                f"model {spec.name!r} needs {what} from the Hugging Face Hub, which is not in the local cache and "
                f"the Hub is not reachable from here. {size}: on a GPU machine with internet it downloads on first "
                f"use, or fill the cache with {how}")
        base, weights = spec.base, spec.weights
        if (spec.base, "model_index.json") in cached:
            base = str(cached[(spec.base, "model_index.json")].parent)     # the cached snapshot folder
        if spec.weights in SDXL_PUBLISHED:
            p = SDXL_PUBLISHED[spec.weights]
            weights = str(cached[(p.repo, p.filename)])
        return base, weights
    return spec.base, spec.weights


def _guidance_meta(meta: dict, path) -> tuple[tuple[float, float] | None, float | None]:
    """(guidance_range, default w) from a student's dmd2.json; (None, None) for a plain student."""
    rng = meta.get("guidance_range")
    if rng is None:
        return None, None
    try:
        low, high = (float(w) for w in rng)
        default = float(meta.get("guidance_default", low))
    except (TypeError, ValueError):
        raise ModelLoadError(f"{path}: guidance_range must be [w_min, w_max], got {rng!r}") from None
    if not low < high or not low <= default <= high:
        raise ModelLoadError(f"{path}: guidance_range {rng!r} and guidance_default {default!r} do not fit")
    return (low, high), default


def _with_flow_shift(family: Family, shift, path) -> Family:
    """A text family shares its encoders and VAE among the teacher and its students, but a flow student trained
    with its own `flow_shift` (dmd2.json) samples on that schedule: then its own shallow copy with that shift."""
    if shift is None or not isinstance(family.schedule, FlowSchedule) or shift == family.schedule.shift:
        return family
    try:
        schedule = FlowSchedule(shift, family.schedule.num_train_timesteps)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    own = copy.copy(family)
    own.schedule = schedule
    return own


def _resolve_base(teacher: str, folder: Path) -> str:
    """dmd2.json's teacher: a path as given (from the working directory), else beside the student, else a Hub repo."""
    if Path(teacher).exists():
        return teacher
    if (folder / teacher).exists():
        return str(folder / teacher)
    return teacher


def _text_student_spec(name: str, weights: Path, meta_path: Path) -> ModelSpec:
    meta = read_json_object(meta_path)
    family = meta.get("family")
    if family not in TEXT_FAMILIES:
        raise ModelLoadError(f"{meta_path}: family {family!r} is not a text-to-image family "
                             f"({', '.join(TEXT_FAMILIES)})")
    if not meta.get("teacher") or not meta.get("timesteps"):
        raise ModelLoadError(f"{meta_path} must name the student's 'teacher' (pipeline folder or Hub repo) "
                             f"and its 'timesteps'")
    return ModelSpec(name, weights, "student", family, timesteps=tuple(int(t) for t in meta["timesteps"]),
                     base=_resolve_base(str(meta["teacher"]), meta_path.parent), weights=str(weights),
                     description=f"local {family} student {weights}")


def spec_for(name: str) -> ModelSpec:
    """The spec of a built-in name, or of a local model: a pixel model folder, an SD/SDXL pipeline folder
    (a teacher), or a text student (a diffusers UNet folder with dmd2.json, a folder with a LoRA
    .safetensors and dmd2.json, or such a weight file whose folder holds dmd2.json)."""
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if path.is_file() and path.suffix in (".safetensors", ".bin") and (path.parent / "dmd2.json").is_file():
        return _text_student_spec(str(path), path, path.parent / "dmd2.json")
    if path.is_dir() and (path / "model_index.json").is_file():
        cls = read_json_object(path / "model_index.json").get("_class_name")
        if cls not in PIPELINE_FAMILIES:
            raise ModelLoadError(f"{path} is a {cls} pipeline; supported: {', '.join(PIPELINE_FAMILIES)}")
        return ModelSpec(str(path), path, "teacher", PIPELINE_FAMILIES[cls], base=str(path),
                         description=f"local {PIPELINE_FAMILIES[cls]} pipeline {path}")
    if path.is_dir() and (path / "dmd2.json").is_file():
        meta = read_json_object(path / "dmd2.json")
        if meta.get("family", "pixel") in TEXT_FAMILIES:
            weights = path if (path / "config.json").is_file() else student_lora_file(path)
            return _text_student_spec(str(path), weights, path / "dmd2.json")
    if path.is_dir() and (path / "config.json").is_file():
        kind = "student" if (path / "dmd2.json").is_file() else "teacher"
        return ModelSpec(str(path), path, kind, description=f"local model {path}")
    raise ModelLoadError(f"unknown model {name!r}; known: {', '.join(BUILTIN)} (or a model folder path)")


def _is_available(spec: ModelSpec) -> bool:
    if spec.family == "pixel":
        return spec.path is not None and (spec.path / "config.json").is_file()
    return all(cached_file(repo, f) is not None for repo, f in _hub_needs(spec))


def available(family: str | None = None, demo: bool = False) -> list[str]:
    """Built-in names whose weights are here (Hub models: already in the local cache; no network), of `family` if
    given; `demo`: only those the default app serves."""
    return [n for n, s in BUILTIN.items()
            if (family is None or s.family == family) and (s.demo or not demo) and _is_available(s)]


def load(name: str) -> LoadedModel:
    """Load (once, then cached) the generator called `name`; a failure is remembered for `loads`."""
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = LoadedModel(spec_for(name))
            except Exception as e:
                _failures[name] = str(e) if isinstance(e, ModelLoadError) else f"{type(e).__name__}: {e}"
                raise
            _failures.pop(name, None)
        return _cache[name]


def loads(name: str) -> bool:
    """Whether `name` loads: tried once, then the answer is remembered (until `forget`), so a broken
    student is left out of the app's lists without being retried on every request."""
    with _lock:
        if name in _failures:
            return False
    try:
        load(name)
    except Exception:
        return False
    return True


def load_failure(name: str) -> str | None:
    """Why `name` failed to load, if it did."""
    return _failures.get(name)


def forget(name: str) -> None:
    """Drop `name` from the cache and forget a failure to load it (a resumed run rewrites its student folder)."""
    with _lock:
        _cache.pop(name, None)
        _failures.pop(name, None)
