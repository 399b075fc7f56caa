"""Leaderboard tab: Bradley-Terry ratings with 95% intervals from the arena votes, the win-rate matrix, exports.

A view costs one COUNT of the votes: the ratings and counts are computed once per new vote count
(`LeaderboardCache`), and the bootstrap intervals (1,000 refits) and the win-rate plot in the background,
in a child process (a thread of this one would hold the GIL and slow the generation threads beside it).
The first view after a vote shows the point ratings at once, with the intervals of the votes before
marked "(updating)" (or "computing..." if there are none yet); the tab fills the new intervals (and the
plot) in when they are ready.

Only votes cast while both names were hidden exist (a battle takes one vote, and the names are revealed
by it). The votes of flagged voters (`ratings.screen_votes`: more than $DMD2_FLAG_VOTES_PER_HOUR votes
in an hour, or the same side in every one of at least $DMD2_FLAG_SAME_SIDE votes) are left out of the
ratings and the plot; a line under the table says how many and why.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from dmd2.arena import VoteStore, leaderboard, win_rate_matrix, win_rate_plot
from dmd2.arena.ratings import (exclusion_line, rating_intervals, screen_votes, screening_from_env, win_rate_png,
                                with_intervals)


def display_name(name: str) -> str:
    """`dmd2.ui.widgets.display_name`, imported on first use: the bootstrap child imports this module and
    needs no torch (which widgets' registry imports)."""
    from dmd2.ui.widgets import display_name as name_of

    return name_of(name)


COLUMNS = ["Rank", "Model", "Rating", "95% CI", "Battles", "Wins", "Losses", "Ties", "Both bad"]
BOOTSTRAP_ROUNDS = 1000          # about 0.5 s for a few hundred votes between three models
EXPORT_FORMATS = ("csv", "jsonl")
COMPUTING = "computing..."       # the interval cell while the bootstrap runs (no earlier one to show)
UPDATING = "(updating)"          # after an interval of fewer votes, while the bootstrap of these runs
FILL_IN_WAIT_S = 120.0           # how long the tab waits for the intervals before leaving "computing..."
BOOTSTRAP_NICE = 10              # the bootstrap process yields the CPU to generation

log = logging.getLogger("dmd2.ui")


def _rows_table(rows: Sequence[Mapping], pending: bool = False) -> pd.DataFrame:
    """COLUMNS from leaderboard rows, ratings rounded; `pending`: the intervals of these votes are not there
    yet (the rows' intervals, if any, are of fewer votes)."""
    out = []
    for r in rows:
        rated = r["rating"] is not None
        ci = (f"{r['ci_low']:.0f} to {r['ci_high']:.0f}" + (f" {UPDATING}" if pending else "")
              if rated and r["ci_low"] is not None else COMPUTING if rated and pending else "")
        out.append([r["rank"] if rated else None, display_name(r["model"]),
                    round(r["rating"]) if rated else None, ci, r["battles"], r["wins"], r["losses"],
                    r["ties"], r["both_bad"]])
    return pd.DataFrame(out, columns=COLUMNS).astype({"Rank": "Int64", "Rating": "Int64"})


def leaderboard_table(votes: Sequence[Mapping], models: Sequence[str],
                      rounds: int = BOOTSTRAP_ROUNDS) -> pd.DataFrame:
    """One row per model (best first; models without votes last, unrated): COLUMNS, ratings rounded."""
    return _rows_table(leaderboard(votes, models=models, rounds=rounds))


def leaderboard_plot(votes: Sequence[Mapping], models: Sequence[str]):
    """The win-rate matrix (row beats column) as a matplotlib Figure, in leaderboard order."""
    order = [r["model"] for r in leaderboard(votes, models=models, rounds=0)]
    matrix, names = win_rate_matrix(votes, models=order)
    return win_rate_plot(matrix, [display_name(n) for n in names])


_pool_lock = threading.Lock()
_pool: list[ProcessPoolExecutor] = []


def _child_start(nice: int, parent: int) -> None:
    """In the bootstrap child: lower its priority, and leave once the server that started it is gone (an idle
    pool worker waits for work forever, so a server killed with SIGKILL or a crash used to leave it behind)."""
    os.nice(nice)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _bootstrap_pool() -> ProcessPoolExecutor:
    """One child process for every leaderboard of this server (spawned, not forked: the server has threads).
    The child imports this module: keep its top-level imports light (no torch)."""
    with _pool_lock:
        if not _pool:
            _pool.append(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_child_start, initargs=(BOOTSTRAP_NICE, os.getpid())))
            atexit.register(_pool[0].shutdown, wait=False, cancel_futures=True)
        return _pool[0]


def _drop_pool(pool: ProcessPoolExecutor) -> None:
    with _pool_lock:
        if _pool and _pool[0] is pool:
            _pool.clear()
    pool.shutdown(wait=False, cancel_futures=True)


class LeaderboardCache:
    """The leaderboard of a vote store: ratings and counts computed once per vote count; the bootstrap
    intervals (`rounds` resamples, seeded by `seed`) and the win-rate plot once per vote count too, in the
    background.

    `view(store, models)` gives (table, plot, pending) at once. `pending` is True while the intervals of
    the votes shown are still being computed: the table then shows the newest intervals computed, of
    fewer votes, marked UPDATING (or COMPUTING where there are none), and the newest plot drawn, except
    that the first view, and any view before there is a rated model, draws its plot here.
    `render(png)` turns the plot's PNG bytes into what the view returns (the tab makes gr.Plot's value
    of it). `in_process=True` runs the background work in this process's worker thread instead of a child
    process. Counters: `fits` (rating refits) and `bootstraps` (background jobs done).
    `screening`: `screen_votes`'s thresholds (default `screening_from_env()`; both None: every vote counts);
    `exclusions()` gives the last view's (total votes, exclusions) and `exclusion_note()` its line.
    """

    def __init__(self, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0, render: Callable[[bytes], Any] = lambda b: b,
                 in_process: bool = False, screening: Mapping | None = None):
        self.rounds, self.seed, self.render, self.in_process = rounds, seed, render, in_process
        self.screening = dict(screening_from_env() if screening is None else screening)
        self._excluded: tuple | None = None      # (key, total votes, exclusions) of the last refit
        self.fits = self.bootstraps = 0
        self._compute = threading.Lock()         # one refit at a time; a second view waits and reuses it
        self._state = threading.Condition()      # guards everything below
        self._point: tuple | None = None         # (key, rows)
        self._plot: tuple | None = None          # (key, rendered plot): the newest drawn
        self._intervals: tuple | None = None     # (key, {model: (low, high)}): the newest computed
        self._wanted: tuple | None = None        # (key, job kwargs): what the worker computes next
        self._worker: threading.Thread | None = None

    def view(self, store: VoteStore, models: Sequence[str]) -> tuple[pd.DataFrame, Any, bool]:
        """(table, plot, pending) for the votes in `store` now, between `models` (and any other voted model)."""
        models = tuple(models)
        with self._compute:
            point = self._point
            if point is None or point[0] != (len(store), models):
                votes = store.votes()
                key = (len(votes), models)       # what was read: a vote may land between the count and the read
                total = len(votes)
                votes, excluded = screen_votes(votes, **self.screening)
                rows = leaderboard(votes, models=models, rounds=0)
                matrix, names = win_rate_matrix(votes, models=[r["model"] for r in rows])
                plot_args = (matrix, [display_name(n) for n in names])
                rated = any(r["rating"] is not None for r in rows)
                if not rated or self._plot is None:      # nothing to wait for, or nothing to show yet
                    plot = self.render(win_rate_png(*plot_args))
                    with self._state:
                        self._plot = (key, plot)
                point = (key, rows)
                with self._state:
                    self._point = point
                    self._excluded = (key, total, excluded)
                    self.fits += 1
                    if rated:
                        self._want(key, dict(votes=[(v["model_a"], v["model_b"], v["outcome"]) for v in votes],
                                             models=models, plot_args=plot_args))
        key, rows = point
        with self._state:
            plot = self._plot[1]
        intervals = self.intervals(key)
        pending = intervals is None and self.rounds > 0 and any(r["rating"] is not None for r in rows)
        if pending:                 # meanwhile the newest intervals of the same models, marked as updating
            with self._state:
                newest = self._intervals
            intervals = newest[1] if newest is not None and newest[0][1] == key[1] else None
        if intervals is not None:
            rows = with_intervals(rows, intervals)
        return _rows_table(rows, pending=pending), plot, pending

    def exclusions(self) -> tuple[int, dict] | None:
        """(votes in the store, `screen_votes` exclusions) as of the last view's refit; None before a view."""
        with self._state:
            return None if self._excluded is None else self._excluded[1:]

    def exclusion_note(self) -> str:
        """The line under the table: how many votes count and how many were excluded, why."""
        got = self.exclusions()
        return "" if got is None else exclusion_line(*got)

    def intervals(self, key) -> dict | None:
        """The intervals of the votes `key` names, or None while they are not computed (or are outdated)."""
        with self._state:
            return self._intervals[1] if self._intervals is not None and self._intervals[0] == key else None

    def ready(self) -> bool:
        """Are the intervals and the plot of the latest view's votes computed (or not needed)?"""
        with self._state:
            point, plot = self._point, self._plot
        if point is None or not any(r["rating"] is not None for r in point[1]):
            return True
        return plot is not None and plot[0] == point[0] and (self.rounds <= 0 or self.intervals(point[0]) is not None)

    def wait(self, timeout: float) -> bool:
        """Block until `ready()` or `timeout` seconds; returns `ready()`."""
        deadline = time.monotonic() + timeout
        with self._state:
            while not self.ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._state.wait(left)
        return True

    def _want(self, key, job: dict) -> None:
        """Ask the worker for the intervals and plot of a vote count (a newer ask replaces one not yet started)."""
        self._wanted = (key, job)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="leaderboard-bootstrap", daemon=True)
            self._worker.start()
        self._state.notify_all()

    def _work(self) -> None:
        """Worker thread: compute the newest wanted intervals and plot, one job at a time, until none is wanted."""
        while True:
            with self._state:
                if self._wanted is None:
                    self._worker = None
                    return
                (key, job), self._wanted = self._wanted, None
            try:
                intervals, png = self._run(**job)
                plot = self.render(png)
            except Exception:                 # never seen; the table keeps saying "computing..."
                log.exception("leaderboard bootstrap failed")
                continue
            with self._state:
                self.bootstraps += 1
                self._intervals = (key, intervals)
                if self._plot is None or self._plot[0][0] <= key[0]:     # never replace a newer plot
                    self._plot = (key, plot)
                self._state.notify_all()

    def _run(self, votes: list[tuple], models: tuple, plot_args: tuple) -> tuple[dict, bytes]:
        """(intervals, plot PNG) of `votes`: in the child process, or here if that is not possible."""
        votes = [dict(model_a=a, model_b=b, outcome=o) for a, b, o in votes]
        kwargs = dict(models=models, rounds=self.rounds, seed=self.seed)
        if not self.in_process:
            pool = _bootstrap_pool()
            try:
                png = pool.submit(win_rate_png, *plot_args)
                intervals = pool.submit(rating_intervals, votes, **kwargs) if self.rounds > 0 else None
                return (intervals.result() if intervals is not None else {}), png.result()
            except Exception as e:            # no child process here (or it died): compute in this thread
                log.warning("leaderboard work in a child process failed (%s); computing in-process", e)
                _drop_pool(pool)
        return (rating_intervals(votes, **kwargs) if self.rounds > 0 else {}), win_rate_png(*plot_args)


_exports: list[tempfile.TemporaryDirectory] = []
_exports_lock = threading.Lock()


def _export_folder() -> Path:
    """This process's one folder for vote exports (in the temp dir, removed when the process exits)."""
    with _exports_lock:
        if not _exports:
            _exports.append(tempfile.TemporaryDirectory(prefix="dmd2-votes-"))
        return Path(_exports[0].name)


def export_votes(store: VoteStore, fmt: str, folder: str | Path | None = None) -> Path:
    """Write every vote to `<folder>/votes.<fmt>` (csv or jsonl), replacing the last export of that format.

    Default folder: one per process, in the temp dir: exports reuse one file per format instead of
    leaving a folder behind each time (Gradio serves a copy from its cache, which `delete_cache` cleans).
    The file is replaced atomically, so a download never gets half an export.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    path = Path(_export_folder() if folder is None else folder) / f"votes.{fmt}"
    (store.export_csv if fmt == "csv" else store.export_jsonl)(path)
    return path


def plot_value(png: bytes):
    """gr.Plot's value for a PNG of a matplotlib figure (what its postprocess makes of the figure itself)."""
    from gradio.components.plot import PlotData

    return PlotData(type="matplotlib", plot="data:image/png;base64," + base64.b64encode(png).decode("ascii"))


def build_leaderboard_tab(models: Sequence[str] | Callable[[], Sequence[str]],
                          store: Callable[[], VoteStore], concurrency_limit: int | None = 4,
                          cache: LeaderboardCache | None = None, votes_path=None) -> dict:
    """The Leaderboard tab (inside an open gr.Blocks); `store()` gives the vote store (opened on first use).

    `models` may be a function giving the current list (read on every refresh). Views run
    `concurrency_limit` at a time in their own queue (not behind generation). `cache` replaces the
    default LeaderboardCache (1,000 bootstrap rounds). `votes_path`: the votes database, named on the tab.
    """
    import anyio
    import gradio as gr

    current = models if callable(models) else (lambda fixed=list(models): fixed)
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        gr.Markdown("Bradley-Terry ratings on the Elo scale (mean 1000; 400 points = 10:1 odds) from "
                    "the arena votes, with 95% bootstrap intervals. Ties and 'both bad' count half a win "
                    "to each side. Rank = 1 + the number of models whose whole interval is above. After new "
                    "votes the intervals take a few seconds; the table fills them in when they are ready.")
        if votes_path is not None:
            gr.Markdown(f"Votes are stored in `{votes_path}`.", elem_id="leaderboard-votes-path")
        refresh = gr.Button("Refresh")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Leaderboard", elem_id="leaderboard-table")
        note = gr.Markdown(elem_id="leaderboard-excluded")     # how many votes were excluded, and why
        plot = gr.Plot(label="Win rates")
        with gr.Row():
            csv_button = gr.Button("Export CSV")
            jsonl_button = gr.Button("Export JSONL")
        file = gr.File(label="Votes", interactive=False)
        if cache is None:
            cache = LeaderboardCache(render=plot_value)

        def show():
            table_now, plot_now, _ = cache.view(store(), list(current()))
            return table_now, plot_value(plot_now) if isinstance(plot_now, bytes) else plot_now

        async def fill_in(shown):
            """After a view: if it said "computing..." or "(updating)", wait for the intervals and show them."""
            column = shown[COLUMNS[3]] if isinstance(shown, pd.DataFrame) and COLUMNS[3] in shown else []
            if not any(cell == COMPUTING or str(cell).endswith(UPDATING) for cell in column):
                return gr.skip(), gr.skip()
            deadline = time.monotonic() + FILL_IN_WAIT_S
            while not cache.ready() and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
            return await anyio.to_thread.run_sync(show)

        limits = dict(concurrency_limit=concurrency_limit, concurrency_id="leaderboard")
        waits = dict(concurrency_limit=None, concurrency_id="leaderboard-fill-in", api_visibility="private",
                     show_progress="hidden")
        shown = refresh.click(show, None, [table, plot], api_name="leaderboard", **limits)
        shown.then(fill_in, table, [table, plot], **waits)
        # /leaderboard keeps its two outputs; the exclusion line is its own step (and endpoint) after it
        shown.then(cache.exclusion_note, None, note, api_name="leaderboard_exclusions", **limits)
        selected = tab.select(show, None, [table, plot], api_visibility="private", **limits)
        selected.then(fill_in, table, [table, plot], **waits)
        selected.then(cache.exclusion_note, None, note, api_visibility="private", **limits)
        csv_button.click(lambda: str(export_votes(store(), "csv")), None, file, api_name="export_csv")
        jsonl_button.click(lambda: str(export_votes(store(), "jsonl")), None, file, api_name="export_jsonl")
    return dict(table=table, plot=plot, refresh=refresh, file=file, cache=cache, note=note)
