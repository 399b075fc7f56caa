"""Hugging Face Spaces' ZeroGPU: `gpu(fn, duration)` is `spaces.GPU` there and `fn` itself everywhere else.

ZeroGPU lends a GPU only while a decorated function runs, so (its conventions) the models are loaded and
placed on `cuda` once at start-up, outside the decorated functions, and each decorated call asks for about
as many seconds as its work needs: a shorter request is scheduled sooner, one that runs over is cut off.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

ZERO_GPU_ENV = "SPACES_ZERO_GPU"    # set by Spaces on ZeroGPU hardware
# Seconds per image per network pass on a ZeroGPU-class GPU (A100/H200 slices), at the family's resolution,
# rounded up from public SDXL/SD1.5 timings; the budget below adds decoding and a margin.
SECONDS_PER_PASS = {"flux": 0.25, "sd3": 0.12, "sdxl": 0.1, "sd15": 0.04, "pixel": 0.002}
MIN_SECONDS, MAX_SECONDS = 15, 300


def on_zero_gpu() -> bool:
    """Whether this app runs on ZeroGPU hardware."""
    return os.environ.get(ZERO_GPU_ENV, "").strip().lower() in ("1", "true", "yes")


def gpu(fn: Callable, duration: int | Callable[..., int] | None = None) -> Callable:
    """`spaces.GPU(fn)` (asking for `duration` seconds, a number or a function of fn's arguments) when the
    `spaces` package is importable; `fn` itself everywhere else."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn) if duration is None else spaces.GPU(duration=duration)(fn)


def sampling_seconds(specs, images: int, teacher_steps: int | None = None, teacher_until: int | None = None) -> int:
    """The GPU seconds to ask for to sample `images` images from each model spec (teachers at
    `teacher_steps` or their default, with CFG counting two passes a step), with a margin. With `teacher_until`
    (Compare's teacher-then-student), a multi-step student that may take it also pays its teacher's whole grid
    (an upper bound: the teacher stops at t)."""
    work = 0.0
    for spec in specs:
        passes = (len(spec.timesteps) or 4) if spec.kind == "student" else (teacher_steps or spec.steps) * 2
        if (teacher_until is not None and spec.kind == "student" and len(spec.timesteps) != 1
                and (not spec.timesteps or teacher_until in spec.timesteps[1:])):    # () : read from dmd2.json later
            passes += (teacher_steps or 50) * 2
        work += 3.0 + passes * images * SECONDS_PER_PASS.get(spec.family, 0.1)     # + loading to the GPU, decoding
    return int(min(MAX_SECONDS, max(MIN_SECONDS, 10 + 1.5 * work)))


def sized_gpu(models: Callable[[], list[str]], images: int, top: int | None = None) -> Callable[[Callable], Callable]:
    """A `wrap` for a tab's sampling function: `gpu(fn)` asking for `sampling_seconds` of the models it may
    sample (all of `models()`, or the `top` most expensive of them) at its `num_images` and `steps` arguments
    (else `images` and each teacher's default)."""
    import inspect

    from dmd2 import registry

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        def duration(*args, **kwargs) -> int:
            given = signature.bind_partial(*args, **kwargs).arguments
            try:
                until = int(float(given.get("teacher_until")))
            except (TypeError, ValueError):
                until = None                # "off", none, or a bad value (refused inside)
            specs = []
            for name in models():
                try:
                    spec = registry.spec_for(name)
                    if until is not None and spec.kind == "student" and not spec.timesteps:
                        # its timesteps are in its dmd2.json: from the loaded model (preloaded on ZeroGPU), so
                        # only a student that can take t pays for the teacher's steps
                        spec = dataclasses.replace(spec, timesteps=registry.load(name).timesteps)
                    specs.append(spec)
                except Exception:           # a broken model costs nothing: it fails at once
                    continue
            cost = lambda s: sampling_seconds([s], images)            # noqa: E731
            specs = sorted(specs, key=cost, reverse=True)[:top] if top else specs
            try:
                n = int(given.get("num_images") or images)
                steps = int(given["steps"]) if given.get("steps") else None
            except (TypeError, ValueError):
                n, steps = images, None     # a bad value is refused inside; ask for the default budget
            return sampling_seconds(specs, max(1, n), steps, until)
        return gpu(fn, duration=duration)
    return wrap
