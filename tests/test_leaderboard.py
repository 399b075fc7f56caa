"""The Leaderboard under load: ratings once per new vote, bootstrap intervals in the background, one export file."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import tempfile

import pytest

from conftest import served
from dmd2.arena import VoteStore, leaderboard, read_csv, read_jsonl
from dmd2.ui.leaderboard import COLUMNS, COMPUTING, UPDATING, LeaderboardCache, export_votes

MODELS = ["m/strong", "m/weak", "m/idle"]
ROUNDS = 40
WAIT_S = 120            # a hang guard for the background bootstrap on a loaded machine, not a timing assertion


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    s = VoteStore(tmp_path / "votes.sqlite", max_votes=None)
    for i, outcome in enumerate(["a", "a", "tie", "b", "both_bad", "a"]):
        s.record(f"b{i}", "m/strong", "m/weak", str(i), i, outcome, "c")
    yield s
    s.close()


def intervals_column(table) -> list[str]:
    return list(table[COLUMNS[3]])


@pytest.mark.parametrize("in_process", [False, True])
def test_ratings_once_per_vote_count_and_the_bootstrap_once(store, in_process):
    cache = LeaderboardCache(rounds=ROUNDS, in_process=in_process)
    first, _, pending = cache.view(store, MODELS)
    assert list(first["Model"]) == ["strong", "weak", "idle"] and first["Rating"].notna().tolist()[:2] == [True] * 2
    if pending:                                      # the point ratings came before the intervals
        assert intervals_column(first) == [COMPUTING, COMPUTING, ""]
    assert cache.wait(WAIT_S)

    second, plot, pending = cache.view(store, MODELS)
    third, plot_again, _ = cache.view(store, MODELS)
    assert not pending and cache.bootstraps == 1 and cache.fits == 1       # views 2 and 3 reused both
    assert plot_again is plot
    expected = {r["model"]: r for r in leaderboard(store.votes(), models=MODELS, rounds=ROUNDS)}
    assert intervals_column(second) == [f"{expected[m]['ci_low']:.0f} to {expected[m]['ci_high']:.0f}"
                                        for m in MODELS[:2]] + [""]
    assert list(second["Rank"])[:2] == [expected[m]["rank"] for m in MODELS[:2]]
    assert second.equals(third)

    store.record("b-new", "m/weak", "m/idle", "x", 0, "a", "c")           # a new vote: computed once more
    fourth, _, pending = cache.view(store, MODELS)
    assert cache.fits == 2 and fourth["Battles"].tolist() == [6, 7, 1]
    if pending:                     # meanwhile: the intervals of the six votes before, marked as updating
        assert intervals_column(fourth) == [f"{cell} {UPDATING}" for cell in intervals_column(second)[:2]] + [COMPUTING]
    assert cache.wait(WAIT_S)
    cache.view(store, MODELS)
    assert cache.bootstraps == 2 and cache.fits == 2


def test_no_votes_need_no_bootstrap(tmp_path):
    with VoteStore(tmp_path / "empty.sqlite") as empty:
        cache = LeaderboardCache(rounds=ROUNDS)
        table, _, pending = cache.view(empty, MODELS)
        assert not pending and cache.ready() and intervals_column(table) == ["", "", ""]
        assert cache.bootstraps == 0


def test_exports_reuse_one_file_per_format(store, tmp_path, monkeypatch):
    """Each export used to leave a fresh dmd2-votes-* folder in the temp dir behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    paths = {fmt: {export_votes(store, fmt) for _ in range(3)} for fmt in ("csv", "jsonl")}
    assert all(len(p) == 1 for p in paths.values())                       # the same file each time
    [csv_path], [jsonl_path] = paths["csv"], paths["jsonl"]
    assert csv_path.parent == jsonl_path.parent
    assert sorted(f.name for f in csv_path.parent.iterdir()) == ["votes.csv", "votes.jsonl"]
    assert len([d for d in (tmp_path / "tmp").iterdir() if d.name.startswith("dmd2-votes-")]) <= 1
    store.record("b-later", "m/weak", "m/strong", "y", 1, "b", "c")
    assert read_csv(export_votes(store, "csv")) == read_jsonl(export_votes(store, "jsonl")) == store.votes()


def test_live_leaderboard_computes_once_for_repeated_views(store, tmp_path):
    import gradio as gr
    from gradio_client import Client

    from dmd2.ui.leaderboard import build_leaderboard_tab

    cache = LeaderboardCache(rounds=ROUNDS)
    with gr.Blocks() as demo:
        build_leaderboard_tab(MODELS, lambda: store, cache=cache)
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        table, plot = client.predict(api_name="/leaderboard")
        assert table["headers"] == COLUMNS and plot is not None
        assert cache.wait(WAIT_S)
        views = [client.predict(api_name="/leaderboard")[0] for _ in range(3)]
    assert cache.fits == 1 and cache.bootstraps == 1
    assert all(v == views[0] for v in views)
    assert all(" to " in row[3] for row in views[0]["data"][:2])          # the intervals, once ready


def test_the_bootstrap_child_leaves_with_a_killed_server():
    """A server killed with SIGKILL used to leave its idle bootstrap process behind for good."""
    import signal
    import subprocess
    import sys
    import time

    server = subprocess.Popen([sys.executable, "-c", "import os, time\n"
                               "from dmd2.ui.leaderboard import _bootstrap_pool\n"
                               "print(_bootstrap_pool().submit(os.getpid).result(), flush=True)\n"
                               "time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(server.stdout.readline())
        assert child != server.pid and alive(child)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    deadline = time.monotonic() + WAIT_S
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(child)


def alive(pid: int) -> bool:
    """Is `pid` a running process (not gone, not a zombie waiting to be reaped)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
