"""Votes that survive a restart (issue 15): dmd2.arena.sync against a local stand-in of the Hub (tests/hub_standin.py),
through huggingface_hub's real upload and download code. No network: the stand-in listens on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time

import huggingface_hub.constants
import pytest

from dmd2.arena import DuplicateVote, VoteStore, leaderboard
from dmd2.arena.store import COLUMNS
from dmd2.arena.sync import SNAPSHOT, VoteSync, start_sync
from hub_standin import HubStandIn

REPO = "alice/dmd2-votes"
TOKEN = "hf_standin_token"
MODELS = ("teacher", "student-1step", "student-4step")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, with HF_ENDPOINT and HF_TOKEN pointing huggingface_hub at it."""
    with HubStandIn() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # read once, at import
        monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
        monkeypatch.delenv("DMD2_VOTES_REPO", raising=False)
        yield standin


def open_store(tmp_path) -> VoteStore:
    return VoteStore(tmp_path / "data" / "votes.sqlite", max_votes=None)


def cast_votes(store: VoteStore, n: int, start: int = 0) -> None:
    """n votes from 3 clients between the 3 models, with every outcome."""
    outcomes = ("a", "a", "b", "tie", "both_bad")
    for i in range(start, start + n):
        a, b = MODELS[i % 3], MODELS[(i + 1 + i // 3 % 2) % 3]
        store.record(f"battle-{i}", a, b, str(i % 10), 1000 + i, outcomes[i % 5], f"client-{i % 3}", now=1e9 + i)


def hub_votes(hub: HubStandIn) -> list[dict]:
    data = hub.file(REPO, SNAPSHOT)
    return [] if data is None else [json.loads(line) for line in data.decode().splitlines()]


def commits(hub: HubStandIn) -> list[tuple]:
    return [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_round_trip_restores_the_same_votes_and_leaderboard(hub, tmp_path):
    store = open_store(tmp_path)
    cast_votes(store, 40)
    before = store.votes()
    board = leaderboard(before, rounds=50)
    assert VoteSync(store, REPO, every_s=3600).sync_now()

    assert hub.repos[("dataset", REPO)]["private"]           # created as a private dataset
    assert hub_votes(hub) == before                          # the store's JSONL export, every column
    snapshot = hub.file(REPO, SNAPSHOT).decode()
    assert "client-0" not in snapshot and store.hash_client("client-0") in snapshot   # hashed ids only
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}

    store.close()
    shutil.rmtree(tmp_path / "data")                         # a Space restart: DB, WAL and salt gone
    fresh = open_store(tmp_path)
    assert len(fresh) == 0
    sync = VoteSync(fresh, REPO, every_s=3600)
    assert sync.restore() == 40
    assert [{c: v[c] for c in COLUMNS} for v in fresh.votes()] == before
    assert leaderboard(fresh.votes(), rounds=50) == board
    assert sync.restore() == 0 and len(fresh) == 40        # restoring again counts nothing twice
    with pytest.raises(DuplicateVote):
        fresh.record("battle-7", "teacher", "student-1step", "7", 1, "a", "client-9")
    n_commits = len(commits(hub))
    assert sync.sync_now() and len(commits(hub)) == n_commits   # nothing new: no commit
    fresh.close()


def test_a_failed_upload_is_retried_and_never_blocks_a_vote(hub, tmp_path, caplog):
    store = open_store(tmp_path)
    cast_votes(store, 5)
    hub.fail_commits = 1
    with caplog.at_level(logging.WARNING, logger="dmd2.arena.sync"):
        sync = VoteSync(store, REPO, every_s=0.2).start()
        wait_for(lambda: len(commits(hub)) >= 1)             # the first upload was refused (500)
        cast_votes(store, 5, start=5)                         # votes keep going in meanwhile
        wait_for(lambda: len(hub_votes(hub)) == 10)          # a later period sent them all
    assert any("failed" in r.getMessage() and "500" in r.getMessage() for r in caplog.records)
    assert hub_votes(hub) == store.votes()
    cast_votes(store, 1, start=10)
    sync.stop()                                               # the last votes go on stop
    assert hub_votes(hub) == store.votes() and len(store) == 11
    sync.stop()                                               # a second stop does nothing
    store.close()


def test_no_upload_before_a_restore_succeeds(hub, tmp_path):
    """After a restart the new DB may get votes before the Hub answers: they join the old ones, never replace them."""
    old = open_store(tmp_path / "old")
    cast_votes(old, 6)
    assert VoteSync(old, REPO).sync_now()
    old.close()
    store = open_store(tmp_path)
    cast_votes(store, 2, start=100)
    sync = VoteSync(store, REPO, every_s=3600)
    hub.fail_downloads = 1                                    # the Hub refuses the snapshot once
    assert not sync.sync_now()
    assert len(hub_votes(hub)) == 6 and len(store) == 2     # nothing overwritten
    assert sync.sync_now()
    assert len(store) == 8 and sorted(v["battle_id"] for v in hub_votes(hub)) == sorted(
        v["battle_id"] for v in store.votes())
    store.close()


def test_start_sync_from_the_environment_restores_in_the_background(hub, tmp_path, monkeypatch):
    old = open_store(tmp_path / "old")
    cast_votes(old, 4)
    assert VoteSync(old, REPO).sync_now()
    old.close()
    monkeypatch.setenv("DMD2_VOTES_REPO", REPO)
    monkeypatch.setenv("DMD2_VOTES_SYNC_MINUTES", "0.005")
    opened = []

    def lazy() -> VoteStore:                                  # the app's lazy store: opened on first use
        if not opened:
            opened.append(open_store(tmp_path))
        return opened[0]
    sync = start_sync(lazy)
    assert isinstance(sync, VoteSync) and sync.every_s == pytest.approx(0.3)
    wait_for(lambda: opened and len(opened[0]) == 4)
    cast_votes(opened[0], 1, start=4)
    wait_for(lambda: len(hub_votes(hub)) == 5)
    sync.stop()
    opened[0].close()


def test_without_a_repo_nothing_is_synced_and_nothing_touches_the_network(hub, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError(f"network used: {args}")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    threads = set(threading.enumerate())
    store = open_store(tmp_path)
    assert start_sync(store) is None
    cast_votes(store, 3)
    time.sleep(0.3)
    assert set(threading.enumerate()) <= threads and hub.requests == []
    store.close()


@pytest.mark.parametrize("repo_id", ["dmd2-votes", "alice/dmd2/votes", "alice/dmd2 votes", "alice/", ""])
def test_a_repo_id_that_is_not_owner_name_is_refused(hub, tmp_path, repo_id):
    with pytest.raises(ValueError, match="DMD2_VOTES_REPO must be a dataset repo id 'owner/name'"):
        VoteSync(tmp_path / "votes.sqlite", repo_id)


def test_a_missing_token_says_to_set_hf_token_as_a_space_secret(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("DMD2_VOTES_REPO", REPO)
    with pytest.raises(ValueError, match="set HF_TOKEN .*Space secret"):
        start_sync(lambda: open_store(tmp_path))
    assert hub.requests == []


def test_a_bad_period_is_refused(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("DMD2_VOTES_REPO", REPO)
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("DMD2_VOTES_SYNC_MINUTES", bad)
        with pytest.raises(ValueError, match="DMD2_VOTES_SYNC_MINUTES must be a number of minutes > 0"):
            start_sync(lambda: open_store(tmp_path))
