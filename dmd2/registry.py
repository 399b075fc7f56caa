"""Named generators (the teacher, students, local runs): where they live, how they sample, a cache."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dmd2.families.base import ModelLoadError
from dmd2.families.pixel import PixelFamily, load_pixel_unet
from dmd2.sampling import ddim_sample, initial_noise, student_sample

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class ModelSpec:
    """What a named generator is: a teacher sampled by DDIM+CFG, or a few-step student."""

    name: str
    path: Path
    kind: str                          # "teacher" or "student"
    family: str = "pixel"
    steps: int = 50                    # teacher default DDIM steps
    guidance: float | None = None      # teacher CFG scale; None = the family's default
    timesteps: tuple[int, ...] = ()    # student timesteps (read from dmd2.json when empty)
    description: str = ""


BUILTIN = {
    "mnist-teacher": ModelSpec("mnist-teacher", ASSETS / "mnist" / "teacher", "teacher",
                               description="MNIST teacher, DDIM 50 steps with CFG"),
    "mnist-dmd2-1step": ModelSpec("mnist-dmd2-1step", ASSETS / "mnist" / "dmd2-1step", "student",
                                  description="DMD2 1-step student of the MNIST teacher"),
    "mnist-dmd2-4step": ModelSpec("mnist-dmd2-4step", ASSETS / "mnist" / "dmd2-4step", "student",
                                  description="DMD2 4-step student of the MNIST teacher"),
}


@dataclass
class Generated:
    """A batch of samples and what it cost."""

    images: np.ndarray      # uint8, N x H x W x C
    labels: np.ndarray      # int64, N
    nfe: int                # network evaluations per image (CFG counts 2 per step)
    seconds: float          # wall time of the whole batch
    extra: dict = field(default_factory=dict)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], N x C x H x W -> uint8 N x H x W x C."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class LoadedModel:
    """A generator ready to sample: family + UNet + how to sample it."""

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        if spec.family != "pixel":
            raise ModelLoadError(f"model {spec.name!r}: family {spec.family!r} is not available here")
        # channels_last: about 1.5x faster convolutions on CPU (benchmarks/sampling.py)
        self.unet = load_pixel_unet(spec.path).to(memory_format=torch.channels_last)
        self.family = PixelFamily.from_unet(self.unet)
        timesteps = spec.timesteps
        if spec.kind == "student" and not timesteps:
            meta = spec.path / "dmd2.json"
            if not meta.is_file():
                raise ModelLoadError(f"student {spec.name!r} has no {meta} naming its timesteps")
            timesteps = tuple(json.loads(meta.read_text())["timesteps"])
        self.timesteps = tuple(int(t) for t in timesteps)

    @property
    def num_classes(self) -> int:
        return self.family.num_classes

    def default_steps(self) -> int:
        return self.spec.steps if self.spec.kind == "teacher" else len(self.timesteps)

    def generate(self, labels, seed: int, steps: int | None = None, guidance: float | None = None,
                 autocast: bool = False, callback=None) -> Generated:
        """Sample one image per label from `seed` (same seed, same starting noise for every model)."""
        labels = np.asarray(labels, dtype=np.int64)
        cond = self.family.condition(labels)
        noise = initial_noise(self.family, len(labels), seed)
        start = time.perf_counter()
        if self.spec.kind == "teacher":
            steps = self.spec.steps if steps is None else int(steps)
            if steps < 1:
                raise ValueError(f"steps must be at least 1, got {steps}")
            g = self.spec.guidance if guidance is None else guidance
            g = self.family.default_guidance if g is None else float(g)
            x = ddim_sample(self.family, self.unet, cond, noise, steps, g, autocast, callback)
            nfe = steps * (1 if g == 1.0 else 2)
            extra = {"guidance": g, "steps": steps}
        else:
            x = student_sample(self.family, self.unet, cond, noise, list(self.timesteps), seed=seed, autocast=autocast)
            nfe = len(self.timesteps)
            extra = {"timesteps": list(self.timesteps), "steps": nfe}
        images = to_uint8(self.family.decode(x))
        return Generated(images, labels, nfe, time.perf_counter() - start, extra)


_cache: dict[str, LoadedModel] = {}
_lock = threading.Lock()


def spec_for(name: str) -> ModelSpec:
    """The spec of a built-in name, or of a model folder path."""
    if name in BUILTIN:
        return BUILTIN[name]
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        kind = "student" if (path / "dmd2.json").is_file() else "teacher"
        return ModelSpec(str(path), path, kind, description=f"local model {path}")
    raise ModelLoadError(f"unknown model {name!r}; known: {', '.join(BUILTIN)} (or a model folder path)")


def available() -> list[str]:
    """Built-in names whose weights are present."""
    return [n for n, s in BUILTIN.items() if (s.path / "config.json").is_file()]


def load(name: str) -> LoadedModel:
    """Load (once, then cached) the generator called `name`."""
    with _lock:
        if name not in _cache:
            _cache[name] = LoadedModel(spec_for(name))
        return _cache[name]


def run_students(runs_root: str | Path) -> list[str]:
    """Student folders of the finished runs under `runs_root` (runs/<name>/student), sorted by run name.

    A run counts as finished when its status.json says so and its student has weights; read per
    call, so a run that finishes while the app is up shows up on the next request.
    """
    root = Path(runs_root)
    if not root.is_dir():
        return []
    found = []
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            state = json.loads((run / "status.json").read_text()).get("state")
        except (OSError, ValueError, AttributeError):
            continue
        student = run / "student"
        if state == "finished" and (student / "config.json").is_file() and (student / "dmd2.json").is_file():
            found.append(str(student))
    return found


def forget(name: str) -> None:
    """Drop `name` from the cache (a resumed run rewrites its student folder)."""
    with _lock:
        _cache.pop(name, None)
