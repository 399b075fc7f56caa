"""The Gradio Blocks app: a tab per module, models from the registry unless given."""

from __future__ import annotations

import os
import threading
from typing import Callable

import gradio as gr

from dmd2 import registry
from dmd2.arena import VoteStore, default_votes_path
from dmd2.arena.store import vote_limit_from_env
from dmd2.ui.arena import Arena, build_arena_tab
from dmd2.ui.auth import TOKEN_ENV, is_public
from dmd2.ui.compare import build_compare_tab
from dmd2.ui.gpu import gpu
from dmd2.ui.leaderboard import build_leaderboard_tab
from dmd2.ui.train import TrainManager, build_train_tab
from training.jobs import default_runs_root
from training.runs import finished_students

TITLE = "DMD2 studio"


def lazy_store(path: str | os.PathLike) -> Callable[[], VoteStore]:
    """A function giving one VoteStore at `path`, opened on first call: building the app touches no disk."""
    lock, opened = threading.Lock(), []

    def store() -> VoteStore:
        with lock:
            if not opened:
                try:
                    opened.append(VoteStore(path, max_votes=vote_limit_from_env()))
                except Exception as e:     # unwritable folder, not a SQLite file, ...: say where
                    raise gr.Error(f"could not open the votes database {path}: {e}") from e
            return opened[0]
    return store


def _same_family(student: str, models: list[str], family: str | None) -> bool:
    """Does a run's student belong in an app of `family` (default: the family of the fixed models, else pixel)?"""
    try:
        want = family or (registry.spec_for(models[0]).family if models else "pixel")
        return registry.spec_for(student).family == want
    except Exception:      # an unreadable run is left out, not fatal
        return False


def app_models(models: list[str], runs_root, family: str | None = None) -> list[str]:
    """The fixed models, then the students of the finished runs under `runs_root` (full UNet or LoRA) of the
    same family that load (a broken one is left out); read per request, so a run that finishes while the
    app is up joins Compare, Arena and Leaderboard."""
    runs = [r for r in finished_students(runs_root) if _same_family(r, models, family) and registry.loads(r)]
    return list(dict.fromkeys(list(models) + runs))


def build_app(models: list[str] | None = None, votes_path: str | os.PathLike | None = None,
              family: str | None = None, runs_root: str | os.PathLike | None = None, public: bool | None = None,
              trainer: TrainManager | None = None) -> gr.Blocks:
    """The app; `models` are registry names or model folders (default: every built-in of `family`
    with weights here; `family` defaults to "pixel"). Text-to-image families ("sdxl", "sd15") get a
    prompt box where the class models have a class picker; given only `models`, theirs decides.

    Arena votes are stored in the SQLite file `votes_path` (default: `default_votes_path()`).
    Runs go to `runs_root` (default: `default_runs_root()`); the students of its finished runs join
    Compare, Arena and Leaderboard while the app runs. `public` (default: on a Hugging Face Space)
    disables training unless $DMD2_ADMIN_TOKEN is set. `trainer` replaces the default TrainManager.
    """
    if models is None:
        models = registry.available(family or "pixel")
    models = list(models)
    mode = ("class" if family == "pixel" else "text") if family else None
    store = lazy_store(default_votes_path() if votes_path is None else votes_path)
    if trainer is None:
        trainer = TrainManager(default_runs_root() if runs_root is None else runs_root,
                               admin_token=os.environ.get(TOKEN_ENV), public=is_public() if public is None else public)

    def current_models() -> list[str]:
        return app_models(models, trainer.runs_root, family)
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nFew-step DMD2 students (Yin et al., 2024) beside their many-step teacher.")
        with gr.Tabs():
            mode = build_compare_tab(models, wrap=gpu, mode=mode, more_models=current_models)["mode"]
            build_arena_tab(Arena(current_models, store, mode=mode), wrap=gpu)
            build_leaderboard_tab(current_models, store)
            build_train_tab(trainer)
    return demo
