"""The Gradio Blocks app: a tab per module, models from the registry unless given; queue and cache settings."""

from __future__ import annotations

import os
import threading
from typing import Callable

import gradio as gr

from dmd2 import registry
from dmd2.arena import VoteStore, default_votes_path
from dmd2.arena.store import vote_limit_from_env
from dmd2.batching import MAX_IMAGES, Batcher
from dmd2.ui.arena import IMAGES_PER_SIDE, Arena, build_arena_tab
from dmd2.ui.auth import TOKEN_ENV, is_public
from dmd2.ui.compare import build_compare_tab
from dmd2.ui.gpu import on_zero_gpu, sized_gpu
from dmd2.ui.leaderboard import build_leaderboard_tab
from dmd2.ui.train import TrainManager, build_train_tab
from training.jobs import default_runs_root
from training.runs import finished_students

TITLE = "DMD2 studio"
CONCURRENCY_ENV = "DMD2_CONCURRENCY"        # generations (Compare, Arena rounds) running at once
QUEUE_SIZE_ENV = "DMD2_QUEUE_SIZE"          # requests waiting at most; more are refused as "busy"
DELETE_CACHE_ENV = "DMD2_DELETE_CACHE"      # "FREQUENCY,AGE" in seconds, or "off"
DELETE_CACHE = (600, 3600)                  # every 10 min, drop Gradio's cached files older than 1 h
QUEUE_PER_WORKER = 32                       # default queue size: 32 waiting requests per generation slot
VOTE_CONCURRENCY = 8                        # votes: a short SQLite transaction each
LIGHT_CONCURRENCY = 4                       # every other event (status polls, lists, exports)
GENERATE_EVENTS = ("compare", "compare_more", "new_round")     # api names of the events that sample
# Arena rounds admitted at once per generation slot when they are batched: enough waiting rounds to fill a
# batch of MAX_IMAGES images (dmd2/batching.py); the slots, not this, bound the CPU work.
ARENA_ROUNDS_PER_SLOT = MAX_IMAGES // IMAGES_PER_SIDE
ZERO_GPU_TRAINING = ("Training is disabled on ZeroGPU: a Space there gets a GPU only for a minute or two per "
                     "request, not for a training run. Use a dedicated GPU Space or train from the command line.")
BUSY_MESSAGE = ("The app is busy: {size} requests are already waiting, as many as it queues. "
                "Try again in a moment.")


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


def _env_int(name: str, default: int) -> int:
    """A positive integer from the environment variable `name` (unset or empty: `default`)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be a whole number >= 1, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"${name} must be a whole number >= 1, got {value}")
    return value


def _env_delete_cache() -> tuple[int, int] | None:
    """`(frequency, age)` from $DMD2_DELETE_CACHE ("600,3600"; "off" disables), else DELETE_CACHE."""
    raw = os.environ.get(DELETE_CACHE_ENV, "").strip().lower()
    if not raw:
        return DELETE_CACHE
    if raw in ("off", "none", "0", "no"):
        return None
    try:
        frequency, age = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"${DELETE_CACHE_ENV} must be FREQUENCY,AGE in seconds (e.g. 600,3600) or off, "
                         f"got {raw!r}") from None
    if frequency < 1 or age < 1:
        raise ValueError(f"${DELETE_CACHE_ENV}: frequency and age must be >= 1 s, got {raw!r}")
    return frequency, age


def default_concurrency() -> int:
    """Generations run at once by default: 1 on a GPU; on CPU, one per group of torch threads that the
    cores hold (with OMP_NUM_THREADS=1 on 2 cores: 2)."""
    import torch

    if torch.cuda.is_available():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, torch.get_num_threads()))


def configure_queue(demo: gr.Blocks, concurrency: int, queue_size: int,
                    arena_rounds: int | None = None) -> dict[str, list[str]]:
    """Queue `demo`: the events that sample (GENERATE_EVENTS) share one group of `concurrency` slots, votes
    have their own (they never wait behind generation; the Leaderboard tab sets its own group), everything
    else runs LIGHT_CONCURRENCY at a time, and at most `queue_size` requests wait. `arena_rounds`: Arena
    rounds go to a group of their own admitting that many at once (their Batcher runs at most `concurrency`
    batches, so the CPU work stays bounded while the waiting rounds share batches).

    A request beyond that is refused (HTTP 503 from /queue/join, Gradio's "queue_full"): the browser shows
    Gradio's "This application is currently busy. Please try again.", gradio_client raises QueueError, and
    the 503's detail, for any other client, is BUSY_MESSAGE. Returns the api names put in each group.
    """
    groups: dict[str, list[str]] = {"generate": [], "votes": [], "arena": []}
    for fn in demo.fns.values():
        name = fn.api_name or ""
        if name == "new_round" and arena_rounds:
            fn.concurrency_id, fn.concurrency_limit = "arena", arena_rounds
            groups["arena"].append(name)
        elif name in GENERATE_EVENTS:
            fn.concurrency_id, fn.concurrency_limit = "generate", concurrency
            groups["generate"].append(name)
        elif name == "vote" or name.startswith("vote_button_"):
            fn.concurrency_id, fn.concurrency_limit = "votes", VOTE_CONCURRENCY
            groups["votes"].append(name)
    demo.queue(max_size=queue_size, default_concurrency_limit=LIGHT_CONCURRENCY)
    _say_busy(demo._queue)
    return groups


def _say_busy(queue) -> None:
    """Make a full queue's refusal say BUSY_MESSAGE (Gradio's own detail is "Queue is full. Max size is N
    and size is N."). Wraps gradio.queueing.Queue.push, which returns (ok, detail, state)."""
    push = queue.push

    async def push_or_busy(*args, **kwargs):
        ok, detail, state = await push(*args, **kwargs)
        if state == "queue_full":
            detail = BUSY_MESSAGE.format(size=queue.max_size)
        return ok, detail, state

    queue.push = push_or_busy


def preload(models: list[str]) -> None:
    """Load every model now, and each multi-step student's own teacher (Compare's "Teacher first"), so that
    nothing loads inside a GPU call (a failure is remembered and shown when the model is used)."""
    for name in models:
        if registry.loads(name):
            m = registry.load(name)
            if m.spec.kind == "student" and len(m.timesteps) > 1:
                try:
                    m.handover_teacher()
                except Exception:   # that student then samples as usual, its caption saying why
                    pass


def build_app(models: list[str] | None = None, votes_path: str | os.PathLike | None = None,
              family: str | None = None, runs_root: str | os.PathLike | None = None, public: bool | None = None,
              trainer: TrainManager | None = None, concurrency: int | None = None, queue_size: int | None = None,
              delete_cache: tuple[int, int] | bool | None = None) -> gr.Blocks:
    """The app; `models` are registry names or model folders (default: every built-in of `family`
    with weights here that the demo serves, `registry.available(family, demo=True)`; `family` defaults to
    "pixel"). Text-to-image families ("sdxl", "sd15", "sd3", "flux") get a
    prompt box where the class models have a class picker; given only `models`, theirs decides.

    Arena votes are stored in the SQLite file `votes_path` (default: `default_votes_path()`).
    Runs go to `runs_root` (default: `default_runs_root()`); the students of its finished runs join
    Compare, Arena and Leaderboard while the app runs. `public` (default: on a Hugging Face Space)
    disables training unless $DMD2_ADMIN_TOKEN is set. `trainer` replaces the default TrainManager.

    Sized for the machine (see `configure_queue`):
    - `concurrency`: generations (Compare, Compare's runs, Arena rounds) running at once; default
      $DMD2_CONCURRENCY, else `default_concurrency()` (1 on a GPU, on CPU cores / torch threads). Votes,
      the Leaderboard and the rest have their own slots, so they never wait behind a generation. Off
      ZeroGPU the Arena's rounds are batched (`dmd2.batching.Batcher`): `concurrency` batches at once,
      ARENA_ROUNDS_PER_SLOT x `concurrency` rounds admitted to share them; Compare keeps its own slots.
    - `queue_size`: requests waiting at most (more are refused with "busy, try again in a moment");
      default $DMD2_QUEUE_SIZE, else QUEUE_PER_WORKER x `concurrency`.
    - `delete_cache`: `(frequency, age)` in seconds: every `frequency` seconds Gradio deletes the files it
      cached for clients (images, exports) that are older than `age`; default $DMD2_DELETE_CACHE
      ("600,3600", or "off"), else DELETE_CACHE; False: never.
    The values in force are in the returned app's `queue_settings` dict.
    """
    if models is None:
        models = registry.available(family or "pixel", demo=True)
    models = list(models)
    mode = ("class" if family == "pixel" else "text") if family else None
    votes_path = default_votes_path() if votes_path is None else votes_path
    vote_limit_from_env()                  # a bad $DMD2_VOTES_PER_MINUTE fails now, not at every vote
    store = lazy_store(votes_path)
    zero = on_zero_gpu()
    if trainer is None:
        trainer = TrainManager(default_runs_root() if runs_root is None else runs_root,
                               admin_token=os.environ.get(TOKEN_ENV), public=is_public() if public is None else public,
                               disabled=ZERO_GPU_TRAINING if zero else None)

    def current_models() -> list[str]:
        return app_models(models, trainer.runs_root, family)
    if zero:
        preload(current_models())     # ZeroGPU: weights load (and go to cuda) now, never inside a GPU call
    concurrency = concurrency or _env_int(CONCURRENCY_ENV, 0) or default_concurrency()
    queue_size = queue_size or _env_int(QUEUE_SIZE_ENV, QUEUE_PER_WORKER * concurrency)
    for what, value in (("concurrency", concurrency), ("queue_size", queue_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a whole number >= 1, got {value!r}")
    if delete_cache is None or delete_cache is True:
        delete_cache = _env_delete_cache()
    with gr.Blocks(title=TITLE, delete_cache=delete_cache or None) as demo:
        gr.Markdown(f"# {TITLE}\nFew-step DMD2 students (Yin et al., 2024) beside their many-step teacher.")
        with gr.Tabs():
            mode = build_compare_tab(models, wrap=sized_gpu(current_models, images=4), mode=mode,
                                     more_models=current_models)["mode"]
            # ZeroGPU samples each call in a GPU worker of its own: nothing to batch across calls there.
            batcher = None if zero else Batcher(slots=concurrency)
            arena = Arena(current_models, store, mode=mode, batcher=batcher)
            build_arena_tab(arena, wrap=sized_gpu(current_models, images=arena.images_per_side, top=2))
            build_leaderboard_tab(current_models, store, votes_path=votes_path)
            build_train_tab(trainer)
    arena_rounds = ARENA_ROUNDS_PER_SLOT * concurrency if batcher else None
    configure_queue(demo, concurrency, queue_size, arena_rounds)
    demo.queue_settings = dict(concurrency=concurrency, queue_size=queue_size, delete_cache=delete_cache or None,
                               arena_rounds=arena_rounds)
    return demo


def describe_queue(settings: dict) -> str:
    """One line for the server log: `build_app(...).queue_settings` in words."""
    cache = settings["delete_cache"]
    batched = (f" (Arena rounds batched: {settings['arena_rounds']} admitted at once)"
               if settings.get("arena_rounds") else "")
    return (f"queue: {settings['concurrency']} generation slot(s){batched}, at most {settings['queue_size']} "
            "requests waiting; Gradio's cache " + (f"cleaned every {cache[0]} s (files older than {cache[1]} s)"
                                          if cache else "never cleaned"))
