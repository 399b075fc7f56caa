"""Leaderboard tab: Bradley-Terry ratings with 95% intervals from the arena votes, the win-rate matrix, exports."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from dmd2.arena import VoteStore, leaderboard, win_rate_matrix, win_rate_plot
from dmd2.ui.widgets import display_name

COLUMNS = ["Rank", "Model", "Rating", "95% CI", "Battles", "Wins", "Losses", "Ties", "Both bad"]
BOOTSTRAP_ROUNDS = 1000          # about 0.3 s for a few hundred votes between three models
EXPORT_FORMATS = ("csv", "jsonl")


def leaderboard_table(votes: Sequence[Mapping], models: Sequence[str],
                      rounds: int = BOOTSTRAP_ROUNDS) -> pd.DataFrame:
    """One row per model (best first; models without votes last, unrated): COLUMNS, ratings rounded."""
    rows = []
    for r in leaderboard(votes, models=models, rounds=rounds):
        rated = r["rating"] is not None
        ci = (f"{r['ci_low']:.0f} to {r['ci_high']:.0f}" if rated and r["ci_low"] is not None else "")
        rows.append([r["rank"] if rated else None, display_name(r["model"]),
                     round(r["rating"]) if rated else None, ci, r["battles"], r["wins"], r["losses"],
                     r["ties"], r["both_bad"]])
    return pd.DataFrame(rows, columns=COLUMNS).astype({"Rank": "Int64", "Rating": "Int64"})


def leaderboard_plot(votes: Sequence[Mapping], models: Sequence[str]):
    """The win-rate matrix (row beats column) as a matplotlib Figure, in leaderboard order."""
    order = [r["model"] for r in leaderboard(votes, models=models, rounds=0)]
    matrix, names = win_rate_matrix(votes, models=order)
    return win_rate_plot(matrix, [display_name(n) for n in names])


def export_votes(store: VoteStore, fmt: str, folder: str | Path | None = None) -> Path:
    """Write every vote to `<folder>/votes-<UTC time>.<fmt>` (csv or jsonl; default: a fresh temp folder)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    folder = Path(tempfile.mkdtemp(prefix="dmd2-votes-") if folder is None else folder)
    path = folder / f"votes-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.{fmt}"
    (store.export_csv if fmt == "csv" else store.export_jsonl)(path)
    return path


def build_leaderboard_tab(models: Sequence[str] | Callable[[], Sequence[str]],
                          store: Callable[[], VoteStore]) -> dict:
    """The Leaderboard tab (inside an open gr.Blocks); `store()` gives the vote store (opened on first use).

    `models` may be a function giving the current list (read on every refresh).
    """
    import gradio as gr

    current = models if callable(models) else (lambda fixed=list(models): fixed)
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        gr.Markdown("Bradley-Terry ratings on the Elo scale (mean 1000; 400 points = 10:1 odds) from "
                    "the arena votes, with 95% bootstrap intervals. Ties and 'both bad' count half a win "
                    "to each side. Rank = 1 + the number of models whose whole interval is above.")
        refresh = gr.Button("Refresh")
        table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Leaderboard", elem_id="leaderboard-table")
        plot = gr.Plot(label="Win rates")
        with gr.Row():
            csv_button = gr.Button("Export CSV")
            jsonl_button = gr.Button("Export JSONL")
        file = gr.File(label="Votes", interactive=False)

        def show():
            votes, names = store().votes(), list(current())
            return leaderboard_table(votes, names), leaderboard_plot(votes, names)

        refresh.click(show, None, [table, plot], api_name="leaderboard")
        tab.select(show, None, [table, plot], api_visibility="private")
        csv_button.click(lambda: str(export_votes(store(), "csv")), None, file, api_name="export_csv")
        jsonl_button.click(lambda: str(export_votes(store(), "jsonl")), None, file, api_name="export_jsonl")
    return dict(table=table, plot=plot, refresh=refresh, file=file)
