"""The Gradio Blocks app: a tab per module, models from the registry unless given."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import gradio as gr

from dmd2 import registry
from dmd2.arena import VoteStore
from dmd2.ui.arena import Arena, build_arena_tab
from dmd2.ui.compare import build_compare_tab
from dmd2.ui.gpu import gpu
from dmd2.ui.leaderboard import build_leaderboard_tab

TITLE = "DMD2 studio"
VOTES_ENV = "DMD2_VOTES"
DEFAULT_VOTES = Path("data") / "votes.sqlite"


def default_votes_path() -> Path:
    """Where arena votes go: $DMD2_VOTES, else data/votes.sqlite (relative to the working directory)."""
    return Path(os.environ.get(VOTES_ENV) or DEFAULT_VOTES)


def lazy_store(path: str | os.PathLike) -> Callable[[], VoteStore]:
    """A function giving one VoteStore at `path`, opened on first call: building the app touches no disk."""
    lock, opened = threading.Lock(), []

    def store() -> VoteStore:
        with lock:
            if not opened:
                try:
                    opened.append(VoteStore(path))
                except Exception as e:     # unwritable folder, not a SQLite file, ...: say where
                    raise gr.Error(f"could not open the votes database {path}: {e}") from e
            return opened[0]
    return store


def build_app(models: list[str] | None = None, votes_path: str | os.PathLike | None = None,
              family: str | None = None) -> gr.Blocks:
    """The app; `models` are registry names or model folders (default: every built-in of `family`
    with weights here; `family` defaults to "pixel"). Text-to-image families ("sdxl", "sd15") get a
    prompt box where the class models have a class picker; given only `models`, theirs decides.

    Arena votes are stored in the SQLite file `votes_path` (default: `default_votes_path()`).
    """
    if models is None:
        models = registry.available(family or "pixel")
    models = list(models)
    mode = ("class" if family == "pixel" else "text") if family else None
    store = lazy_store(default_votes_path() if votes_path is None else votes_path)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nFew-step DMD2 students (Yin et al., 2024) beside their many-step teacher.")
        with gr.Tabs():
            mode = build_compare_tab(models, wrap=gpu, mode=mode)["mode"]
            build_arena_tab(Arena(models, store, mode=mode), wrap=gpu)
            build_leaderboard_tab(models, store)
    return demo
