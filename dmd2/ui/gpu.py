"""`gpu(fn)`: the Hugging Face Spaces (ZeroGPU) decorator when the `spaces` package is importable, a no-op otherwise."""

from __future__ import annotations

from typing import Callable


def gpu(fn: Callable, duration: int | None = None) -> Callable:
    """`spaces.GPU(fn)` (with `duration` seconds, if given) on Spaces; `fn` itself everywhere else."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn) if duration is None else spaces.GPU(duration=duration)(fn)
