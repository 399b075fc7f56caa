"""The Gradio Blocks app: a tab per module, models from the registry unless given."""

from __future__ import annotations

from typing import Callable

import gradio as gr

from dmd2 import registry
from dmd2.ui.compare import build_compare_tab

TITLE = "DMD2 studio"


def gpu(fn: Callable) -> Callable:
    """`spaces.GPU(fn)` on Hugging Face Spaces (ZeroGPU), `fn` unchanged elsewhere."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def build_app(models: list[str] | None = None) -> gr.Blocks:
    """The app; `models` are registry names or model folders (default: every built-in with weights)."""
    models = registry.available() if models is None else list(models)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nFew-step DMD2 students (Yin et al., 2024) beside their many-step teacher.")
        with gr.Tabs():
            build_compare_tab(models, wrap=gpu)
    return demo
