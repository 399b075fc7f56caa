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


# --- guidance-conditioned students: one w for all of them -------------------------------------------------
GUIDED_W_LABEL = "Guided student's guidance w"
GUIDED_W_STEP = 0.05
_W_TOLERANCE = 1e-9          # as dmd2.guidance.check_guidance: a slider's 2.9999999 is still inside [1, 3]


def guided_students(models) -> list[tuple[str, tuple[float, float], float]]:
    """(panel name, guidance range, default w) of each guidance-conditioned student among `models` that loads."""
    found = []
    for name in models:
        try:
            m = registry.load(name)
        except Exception:   # a broken model says so when it is sampled
            continue
        if m.guided:
            found.append((display_name(name), tuple(m.guidance_range), m.guidance_default))
    return found


def shared_range(students) -> tuple[float, float] | None:
    """The w every one of `guided_students`' ranges admits (their intersection); None if they share none."""
    low = max(rng[0] for _, rng, _ in students)
    high = min(rng[1] for _, rng, _ in students)
    return (low, high) if low <= high else None


def _ranges(students) -> str:
    return "; ".join(f"{name} [{lo:g}, {hi:g}]" for name, (lo, hi), _ in students)


def check_guided_w(value, students) -> float | None:
    """The w to sample every one of `students` (`guided_students`) at, from a control's raw value; None (no
    value, or no guided student) means each its own default. ValueError, one line naming the range, if the
    value is not a number inside every student's range."""
    if not students or value is None:
        return None
    shared = shared_range(students)
    if shared is None:
        raise ValueError(f"{GUIDED_W_LABEL}: the guided students' ranges do not overlap ({_ranges(students)}), "
                         "so no one w suits them all; compare them separately")
    low, high = shared
    whose = f"{students[0][0]}'s range" if len(students) == 1 else f"the range {_ranges(students)} share"
    try:
        w = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"{GUIDED_W_LABEL} must be a number between {low:g} and {high:g} ({whose}), "
                         f"got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(w) and low - _W_TOLERANCE <= w <= high + _W_TOLERANCE):
        raise ValueError(f"{GUIDED_W_LABEL} must be between {low:g} and {high:g} ({whose}), got {value!r}")
    return min(max(w, low), high)


def guided_w_control(students) -> dict:
    """The w slider's settings for `guided_students` (gr.Slider keyword arguments): hidden when there is none;
    else limited to the range they share (the hull, if they share none: a request then names the ranges),
    starting at the first student's default."""
    if not students:
        return dict(visible=False, minimum=0.0, maximum=1.0, value=None, info=None)
    low, high = shared_range(students) or (min(r[0] for _, r, _ in students), max(r[1] for _, r, _ in students))
    value = min(max(students[0][2], low), high)
    note = "" if shared_range(students) else " (they share no w)"
    return dict(visible=True, minimum=low, maximum=high, value=value,
                info=f"guidance-conditioned students only (teachers: the CFG slider); trained on "
                     f"{_ranges(students)}{note}")


def format_w(w: float) -> str:
    """A guided student's w for a caption: 'w=2.0', 'w=2.25'."""
    text = f"{w:g}"
    return f"w={text}.0" if text.lstrip("-").isdigit() else f"w={text}"
