"""What several tabs show alike: panel names, image grids, the prompt box, which conditioning the models take."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from dmd2 import registry
from dmd2.guidance import parse_entry

DISPLAY_SCALE = 4       # 32 px digits shown at 128 px (nearest neighbour, no blur)


def display_name(name: str) -> str:
    """A short panel title: the built-in name, or the folder name of a model path (for a trainer's
    export, `RUN/student`, the run's name: every run's student folder is called `student`); a
    guidance-conditioned student's Arena entry `<model>@w=<w>` as that name and ` (w=<w>)`."""
    model, w = parse_entry(name)
    if w is not None:
        return f"{display_name(model)} (w={w:g})"
    if name in registry.BUILTIN:
        return name
    path = Path(name)
    if path.name == "student" and path.parent.name:
        return path.parent.name
    return path.name or name


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """uint8 N x H x W x C -> one uint8 image, a near-square grid with `pad` white pixels between cells."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = img
    return grid


def conditioning(models) -> str:
    """"class" or "text": what the models take (ValueError if they mix); "class" when none is known."""
    kinds = set()
    for name in models:
        try:
            kinds.add(registry.spec_for(name).conditioning)
        except Exception:  # an unknown or broken model says so when it is loaded
            continue
    if len(kinds) > 1:
        raise ValueError("class-conditional and text-to-image models cannot be compared in one app: "
                         "serve them with separate --family values")
    return kinds.pop() if kinds else "class"


def prompt_box(examples: list[str]):
    """A prompt textbox (first example in it) with the examples below it to click (inside an open gr.Blocks)."""
    import gradio as gr

    box = gr.Textbox(value=examples[0] if examples else "", label="Prompt", lines=2, max_lines=4,
                     placeholder="Describe an image (at most 300 characters, 77 CLIP tokens)")
    return box


_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s'\"`,;:()\[\]]+/)*([^\s'\"`,;:()\[\]]*)")
log = logging.getLogger("dmd2.ui")


def public_message(error) -> str:
    """What a public page may show of an error: its first line, with every absolute server path cut to its
    last part (`/srv/app/runs/x/student` -> `student`). The whole error goes to the server log."""
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    log.warning("shown to a user as a one-line error: %s", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "/", first)
