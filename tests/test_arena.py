"""Arena back end: the vote store (WAL, exactly-once, rate limit, hashed clients), battle tokens, ratings."""

from __future__ import annotations

import hashlib
import hmac
import math
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from dmd2.arena import (Battle, BattleBook, DuplicateVote, InvalidToken, NotVotable, RateLimited,
                        VoteStore, issue_token, leaderboard, new_battle, pick_pair, read_csv,
                        read_jsonl, verify_token, win_rate_matrix, win_rate_plot)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    s = VoteStore(tmp_path / "data" / "votes.sqlite", max_votes=1000)
    yield s
    s.close()


def vote(store, battle_id, client="client-1", outcome="a", now=None, a="teacher", b="student"):
    return store.record(battle_id, a, b, "7", 123, outcome, client, now=now)


# ---------------------------------------------------------------- the vote store

def test_store_creates_folder_and_uses_wal(store):
    assert store.path.exists()
    with sqlite3.connect(store.path) as conn:           # an independent reader, not our code
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_vote_recorded_exactly_once_and_replay_rejected(store):
    vote(store, "b1", outcome="a", now=100.0)
    with pytest.raises(DuplicateVote, match="b1"):
        vote(store, "b1", outcome="b", client="someone-else")
    rows = store.votes()
    assert len(rows) == 1
    assert rows[0] | {"client_hash": None} == dict(
        battle_id="b1", model_a="teacher", model_b="student", prompt="7", seed=123, outcome="a",
        created_at=100.0, client_hash=None)


def test_malformed_votes_rejected(store):
    with pytest.raises(ValueError, match="outcome"):
        vote(store, "b1", outcome="left")
    with pytest.raises(ValueError, match="two different models"):
        vote(store, "b2", a="teacher", b="teacher")
    assert store.votes() == []


def test_many_threads_each_vote_recorded_exactly_once(store):
    errors, barrier = [], threading.Barrier(20)

    def worker(t):
        barrier.wait()
        for k in range(10):
            try:
                vote(store, f"t{t}-v{k}", client=f"client-{t}", outcome="ab"[k % 2])
            except Exception as e:                      # noqa: BLE001 -- any error fails the test
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    ids = [r["battle_id"] for r in store.votes()]
    assert len(ids) == 200 and set(ids) == {f"t{t}-v{k}" for t in range(20) for k in range(10)}


def test_racing_votes_on_one_battle_only_one_wins(store):
    results, barrier = [], threading.Barrier(20)

    def worker(t):
        barrier.wait()
        try:
            vote(store, "contested", client=f"c{t}")
            results.append("ok")
        except DuplicateVote:
            results.append("dup")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == ["dup"] * 19 + ["ok"]
    assert len(store) == 1


RACER = """
import pathlib, sys, time
from dmd2.arena.store import VoteStore, DuplicateVote
s, ok = VoteStore(sys.argv[1], max_votes=None), 0
gate = pathlib.Path(sys.argv[3])
(gate / sys.argv[2]).touch()
while len(list(gate.iterdir())) < 3:      # start together, so the processes really race
    time.sleep(0.005)
for k in range(100):
    try:
        s.record(f"shared-{k}", "teacher", "student", "3", k, "tie", sys.argv[2]); ok += 1
    except DuplicateVote:
        pass
print(ok)
"""


def test_racing_processes_record_each_battle_once(store, tmp_path):
    (tmp_path / "gate").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(store.path), f"proc-{p}", str(tmp_path / "gate")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sum(int(out) for out, _ in outs) == 100            # every battle won by exactly one process
    assert sorted(r["battle_id"] for r in store.votes()) == sorted(f"shared-{k}" for k in range(100))


def test_rate_limit_per_client_rolling_window(tmp_path):
    with VoteStore(tmp_path / "votes.sqlite", max_votes=3, window_s=60) as s:
        for k in range(3):
            vote(s, f"b{k}", client="eager", now=1000.0 + k)
        with pytest.raises(RateLimited, match="3 votes per 60 s") as info:
            vote(s, "b3", client="eager", now=1010.0)
        assert info.value.max_votes == 3 and info.value.retry_after_s == pytest.approx(50.0)
        vote(s, "b4", client="patient", now=1010.0)            # other clients are unaffected
        vote(s, "b5", client="eager", now=1060.5)              # first vote has left the window
        assert [r["battle_id"] for r in s.votes()] == ["b0", "b1", "b2", "b4", "b5"]


def test_every_id_of_a_voter_carries_the_limit(tmp_path):
    """A fresh session does not reset the limit while the voter's address (or user) is over it."""
    with VoteStore(tmp_path / "votes.sqlite", max_votes=3, window_s=60) as s:
        for k in range(3):
            vote(s, f"b{k}", client=[f"session:{k}", "address:203.0.113.7"], now=1000.0 + k)
        with pytest.raises(RateLimited) as info:                          # a new session, the same address
            vote(s, "b3", client=["session:new", "address:203.0.113.7"], now=1010.0)
        assert info.value.retry_after_s == pytest.approx(50.0)
        vote(s, "b4", client=["session:new", "address:198.51.100.1"], now=1010.0)   # another address
        with pytest.raises(RateLimited):                                  # ... but that session is at 1 of 3:
            for k in range(3):                                            # the session limit still holds
                vote(s, f"b5-{k}", client=["session:new", f"address:192.0.2.{k}"], now=1011.0 + k)
        assert [r["battle_id"] for r in s.votes()] == ["b0", "b1", "b2", "b4", "b5-0", "b5-1"]
        assert s.votes()[0]["client_hash"] == s.hash_client("session:0")  # the row keeps the first id
        vote(s, "b6", client=["session:late", "address:203.0.113.7"], now=1060.5)   # b0 has left the window


def test_ids_of_recent_votes_are_kept_only_for_the_window(tmp_path):
    with VoteStore(tmp_path / "votes.sqlite", max_votes=5, window_s=60) as s:
        vote(s, "b0", client=["session:a", "address:203.0.113.7"], now=1000.0)
        vote(s, "b1", client=["session:b", "address:198.51.100.1"], now=1030.0)
        with sqlite3.connect(s.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM recent_clients").fetchone()[0] == 4
        vote(s, "b2", client=["session:c", "address:192.0.2.1"], now=1061.0)
        with sqlite3.connect(s.path) as conn:                              # b0's ids are gone, its vote is not
            kept = {h for (h,) in conn.execute("SELECT client_hash FROM recent_clients")}
        assert s.hash_client("address:203.0.113.7") not in kept and s.hash_client("address:198.51.100.1") in kept
        assert len(s) == 3


def test_client_ids_are_stored_hashed(tmp_path, monkeypatch):
    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    raw = "alice@192.168.7.77#session-9f1c"
    path = tmp_path / "votes.sqlite"
    s = VoteStore(path)
    vote(s, "b1", client=raw)
    stored = s.votes()[0]["client_hash"]
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    for f in files:                                        # while open: main file and WAL
        assert raw.encode() not in (f.read_bytes() if f.exists() else b"")
    s.close()
    assert raw.encode() not in path.read_bytes()
    assert raw not in stored and len(stored) == 64

    with VoteStore(path) as again:                         # the per-store salt persists beside the DB
        assert again.hash_client(raw) == stored
    with VoteStore(tmp_path / "other" / "votes.sqlite") as other:   # another store, another salt
        assert other.hash_client(raw) != stored
    monkeypatch.setenv("DMD2_ARENA_SALT", "pepper")
    with VoteStore(tmp_path / "env" / "votes.sqlite") as env:
        assert env.hash_client(raw) == hmac.new(b"pepper", raw.encode(), hashlib.sha256).hexdigest()


def test_csv_and_jsonl_export_round_trip(store, tmp_path):
    vote(store, "b1", outcome="a", now=1.25)
    store.record("b2", "m-1step", "m-4step", 'a "quoted", comma\nnewline prompt — ünïcode', 2**32 - 1,
                 "both_bad", "c2", now=1712345678.123456)
    vote(store, "b3", outcome="tie")
    assert store.export_csv(tmp_path / "out" / "votes.csv") == 3
    assert store.export_jsonl(tmp_path / "out" / "votes.jsonl") == 3
    assert read_csv(tmp_path / "out" / "votes.csv") == store.votes()
    assert read_jsonl(tmp_path / "out" / "votes.jsonl") == store.votes()


# ---------------------------------------------------------------- battles and tokens

def finished_battle(**kw) -> Battle:
    b = new_battle(["teacher", "1step", "4step"], "digit 7", np.random.default_rng(0), **kw)
    b.image_a, b.image_b = np.zeros((4, 4)), np.zeros((4, 4))
    return b


def test_pick_pair_distinct_and_sides_shuffled():
    rng = np.random.default_rng(0)
    pairs = [pick_pair(["x", "y", "z"], rng) for _ in range(300)]
    assert all(a != b for a, b in pairs)
    assert {("x", "y"), ("y", "x")} <= set(pairs)             # both sides happen for a pair
    assert len(set(pairs)) == 6
    with pytest.raises(ValueError, match="two different models"):
        pick_pair(["x", "x"], rng)


def test_good_token_verifies_and_hides_names():
    book, battle = BattleBook(secret=b"s3cret"), finished_battle(seed=42)
    token = book.issue(battle, now=100.0)
    for name in ("teacher", "1step", "4step", "digit"):
        assert name not in token
    got = book.verify(token, now=110.0)
    assert (got["model_a"], got["model_b"], got["prompt"], got["seed"]) == (
        battle.model_a, battle.model_b, "digit 7", 42)


def test_forged_and_tampered_tokens_rejected():
    book = BattleBook(secret=b"s3cret")
    token = book.issue(finished_battle(), now=100.0)
    battle_id, sig = token.split(".")
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    forged = [
        "", "nodot", "a.b.c",
        f"{battle_id}.{flipped}",                                      # tampered signature
        f"made-up-id.{sig}",                                           # forged battle id
        issue_token(book._pending[battle_id], b"wrong secret"),        # signed with another key
    ]
    for bad in forged:
        with pytest.raises(InvalidToken):
            book.verify(bad, now=100.0)
    book._pending[battle_id]["model_a"] = "someone-else"              # server copy altered: sig breaks
    with pytest.raises(InvalidToken, match="signature"):
        book.verify(token, now=100.0)


def test_token_expiry_and_pure_functions():
    payload = dict(battle_id="b1", model_a="x", model_b="y", prompt="3", seed=1, issued_at=100.0)
    token = issue_token(payload, b"k")
    assert verify_token(token, b"k", {"b1": payload}, max_age_s=60, now=150.0) == payload
    with pytest.raises(InvalidToken, match="expired"):
        verify_token(token, b"k", {"b1": payload}, max_age_s=60, now=161.0)
    book = BattleBook(secret=b"k", max_age_s=60)
    old = book.issue(finished_battle(), now=0.0)
    book.issue(finished_battle(), now=100.0)                 # issuing prunes the expired one
    assert len(book) == 1
    with pytest.raises(InvalidToken, match="unknown battle"):
        book.verify(old, now=100.0)


def test_failed_generation_is_not_votable():
    battle = finished_battle()
    assert battle.votable
    battle.image_b, battle.error_b = None, "out of memory"
    assert not battle.votable
    with pytest.raises(NotVotable, match="out of memory"):
        BattleBook(secret=b"k").issue(battle)


# ---------------------------------------------------------------- ratings

TRUE_ELO = {"m800": 800.0, "m950": 950.0, "m1050": 1050.0, "m1200": 1200.0}   # mean = 1000


def simulated_votes(n=3000, seed=0):
    rng, names = np.random.default_rng(seed), list(TRUE_ELO)
    votes = []
    for _ in range(n):
        a, b = pick_pair(names, rng)
        p_a = 1.0 / (1.0 + 10 ** ((TRUE_ELO[b] - TRUE_ELO[a]) / 400))
        votes.append(dict(model_a=a, model_b=b, outcome="a" if rng.random() < p_a else "b"))
    return votes


def test_bradley_terry_recovers_known_strengths():
    board = leaderboard(simulated_votes(), rounds=300, seed=0)
    assert [r["model"] for r in board] == ["m1200", "m1050", "m950", "m800"]
    assert [r["rank"] for r in board] == [1, 2, 3, 4]
    assert np.mean([r["rating"] for r in board]) == pytest.approx(1000.0)
    for r in board:
        assert r["ci_low"] <= TRUE_ELO[r["model"]] <= r["ci_high"], r
        assert r["ci_low"] < r["rating"] < r["ci_high"] and r["ci_high"] - r["ci_low"] < 80
    assert sum(r["battles"] for r in board) == 2 * 3000


def test_bootstrap_intervals_cover_truth_across_seeds():
    """Not one lucky seed: over 12 simulated arenas, most 95% intervals contain the true rating."""
    hits = [r["ci_low"] <= TRUE_ELO[r["model"]] <= r["ci_high"]
            for seed in range(100, 112) for r in leaderboard(simulated_votes(1000, seed), rounds=100, seed=seed)]
    assert len(hits) == 48 and np.mean(hits) >= 0.8


def test_anchor_model_is_1000_and_gaps_kept():
    votes = simulated_votes(1000, seed=1)
    plain = leaderboard(votes, rounds=0)
    assert [r["rank"] for r in plain] == [1, 2, 3, 4] and plain[0]["ci_low"] is None
    by_mean = {r["model"]: r["rating"] for r in plain}
    anchored = leaderboard(votes, anchor="m800", rounds=50)
    row = next(r for r in anchored if r["model"] == "m800")
    assert row["rating"] == pytest.approx(1000.0) and row["ci_low"] == row["ci_high"] == pytest.approx(1000.0)
    for r in anchored:
        assert r["rating"] - 1000.0 == pytest.approx(by_mean[r["model"]] - by_mean["m800"], abs=1e-3)


def test_ties_count_half_and_both_bad_choice():
    votes = ([dict(model_a="x", model_b="y", outcome="a")] * 30 + [dict(model_a="y", model_b="x", outcome="a")] * 10
             + [dict(model_a="x", model_b="y", outcome="tie")] * 20)
    board = {r["model"]: r for r in leaderboard(votes, rounds=0)}
    # x scores 30 + 10 = 40 of 60 -> odds 2:1 -> gap 400 log10 2 (the tiny prior shrinks it a hair)
    assert board["x"]["rating"] - board["y"]["rating"] == pytest.approx(400 * math.log10(2), abs=0.5)
    assert (board["x"]["wins"], board["x"]["losses"], board["x"]["ties"]) == (30, 10, 20)
    assert (board["y"]["wins"], board["y"]["losses"], board["y"]["ties"]) == (10, 30, 20)

    even = leaderboard([dict(model_a="x", model_b="y", outcome="tie")] * 5, rounds=0)
    assert [r["rating"] for r in even] == pytest.approx([1000.0, 1000.0])

    skew = [dict(model_a="x", model_b="y", outcome="a")] * 10 + [dict(model_a="x", model_b="y", outcome="both_bad")] * 30
    gap = {}
    for mode in ("tie", "exclude"):
        b = {r["model"]: r for r in leaderboard(skew, rounds=0, both_bad=mode)}
        gap[mode] = b["x"]["rating"] - b["y"]["rating"]
        assert b["x"]["battles"] == 40 and b["x"]["both_bad"] == 30
    assert gap["tie"] == pytest.approx(400 * math.log10(25 / 15), abs=0.5)   # 10 + 15 of 40
    assert gap["exclude"] > 800                                            # 10 of 10: only the prior holds it
    with pytest.raises(ValueError, match="both_bad"):
        leaderboard(skew, both_bad="ignore")


def test_model_without_battles_is_listed_unrated():
    votes = simulated_votes(400, seed=2)
    board = leaderboard(votes, models=["fresh-student", *TRUE_ELO], rounds=30)
    last = board[-1]
    assert last["model"] == "fresh-student"
    assert last["rating"] is None and last["ci_low"] is None and last["rank"] is None and last["battles"] == 0
    assert all(r["rating"] is not None for r in board[:-1])
    with pytest.raises(ValueError, match="no counted battles"):
        leaderboard(votes, models=["fresh-student"], anchor="fresh-student")
    empty = leaderboard([], models=["a", "b"])
    assert [(r["model"], r["rating"], r["battles"]) for r in empty] == [("a", None, 0), ("b", None, 0)]


def test_win_rate_matrix_and_plot():
    votes = simulated_votes(600, seed=3)
    M, names = win_rate_matrix(votes, models=["m1200", "m1050", "m950", "m800"])
    assert names == ["m1200", "m1050", "m950", "m800"]
    assert np.isnan(np.diag(M)).all()
    off = ~np.eye(4, dtype=bool)
    assert np.allclose((M + M.T)[off], 1.0)
    assert (M[0, 1:] > 0.5).all() and (M[3, :3] < 0.5).all()
    M2, names2 = win_rate_matrix([dict(model_a="p", model_b="q", outcome="a")], models=["p", "q", "r"])
    assert np.isnan(M2[0, 2]) and M2[0, 1] == 1.0
    fig = win_rate_plot(M, names)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert len(ax.texts) == 12                                       # one label per played cell


def test_the_vote_limit_comes_from_the_environment(monkeypatch):
    from dmd2.arena.store import vote_limit_from_env

    monkeypatch.delenv("DMD2_VOTES_PER_MINUTE", raising=False)
    assert vote_limit_from_env() == 30
    monkeypatch.setenv("DMD2_VOTES_PER_MINUTE", "5")
    assert vote_limit_from_env() == 5
    monkeypatch.setenv("DMD2_VOTES_PER_MINUTE", "0")
    assert vote_limit_from_env() is None                       # no limit, for a closed load test
    for bad in ("many", "-1"):
        monkeypatch.setenv("DMD2_VOTES_PER_MINUTE", bad)
        with pytest.raises(ValueError, match="DMD2_VOTES_PER_MINUTE"):
            vote_limit_from_env()
