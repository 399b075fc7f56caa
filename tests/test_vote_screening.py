"""Which votes the Leaderboard counts (issue 15, "abuse"): only votes cast while the names were hidden, not
those of flagged voters (too many an hour, always the same side), with a line saying how many were left out
and why; and the exports keep hashed ids only."""

from __future__ import annotations

import copy
import csv
import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest

from conftest import make_tiny_students, served
from dmd2.arena import VoteStore
from dmd2.arena.ratings import exclusion_line, leaderboard, screen_votes, screening_from_env
from dmd2.ui.arena import Arena, VoteRejected
from dmd2.ui.leaderboard import LeaderboardCache, export_votes

OFF = dict(max_per_hour=None, same_side_min=None)


def vote(i, voter, outcome="a", t=0.0, a="m/x", b="m/y"):
    return dict(battle_id=f"b{i}", model_a=a, model_b=b, prompt="p", seed=0, outcome=outcome,
                created_at=float(t), client_hash=voter)


def mixed(voter, n, start=0, t0=0.0, step=60.0):
    return [vote(start + i, voter, "ab"[i % 2], t0 + i * step) for i in range(n)]


def test_too_many_votes_in_an_hour_flags_every_vote_of_that_voter():
    fast = [vote(i, "bot", "ab"[i % 3 == 0], t=i * 10.0) for i in range(121)]        # 121 in 20 minutes
    slow = mixed("human", 150, start=1000, step=3600 / 100)                          # 100 an hour: fine
    votes = fast + slow
    before = copy.deepcopy(votes)
    kept, excl = screen_votes(votes, max_per_hour=120, same_side_min=None)
    assert votes == before                                                           # pure: input untouched
    assert kept == slow
    assert excl["votes_per_hour"] == {"voters": 1, "votes": 121, "threshold": 120}
    assert excl["same_side"]["votes"] == 0
    # exactly 120 in an hour is allowed; the window is rolling, not the clock hour
    kept, excl = screen_votes([vote(i, "v", "ab"[i % 2], t=1800 + i) for i in range(120)], max_per_hour=120)
    assert len(kept) == 120 and excl["votes_per_hour"]["votes"] == 0
    edge = [vote(i, "v", "ab"[i % 2], t=i * (3600 / 120)) for i in range(121)]       # 121st at exactly 1 h
    assert len(screen_votes(edge, max_per_hour=120)[0]) == 121


def test_always_the_same_side_over_enough_votes_is_flagged():
    votes = ([vote(i, "left", "a", t=i * 600) for i in range(20)] +                  # 20 x "A": flagged
             [vote(100 + i, "right", "b", t=i * 600) for i in range(20)] +           # 20 x "B": flagged
             [vote(200 + i, "few", "a", t=i * 600) for i in range(19)] +             # 19: too few to say
             [vote(300 + i, "fair", "a" if i else "tie", t=i * 600) for i in range(30)] +
             [vote(400, None, "a")])                                                 # no voter id: kept
    kept, excl = screen_votes(votes, max_per_hour=None, same_side_min=20)
    assert {v["client_hash"] for v in kept} == {"few", "fair", None} and len(kept) == 50
    assert excl["same_side"] == {"voters": 2, "votes": 40, "threshold": 20}
    assert screen_votes(votes, **OFF)[0] == votes


def test_a_voter_flagged_both_ways_counts_once():
    votes = [vote(i, "bot", "a", t=i) for i in range(130)]
    kept, excl = screen_votes(votes, max_per_hour=120, same_side_min=20)
    assert kept == [] and excl["votes_per_hour"]["votes"] == 130 and excl["same_side"]["votes"] == 0
    assert exclusion_line(130, excl) == ("Counted 0 of 130 votes; excluded 130: 130 from 1 voter with more "
                                         "than 120 votes in an hour.")
    assert exclusion_line(5, screen_votes(mixed("h", 5))[1]) == "All 5 votes counted; none excluded."


def test_thresholds_from_the_environment(monkeypatch):
    monkeypatch.delenv("DMD2_FLAG_VOTES_PER_HOUR", raising=False)
    monkeypatch.delenv("DMD2_FLAG_SAME_SIDE", raising=False)
    assert screening_from_env() == dict(max_per_hour=120, same_side_min=20)
    monkeypatch.setenv("DMD2_FLAG_VOTES_PER_HOUR", "30")
    monkeypatch.setenv("DMD2_FLAG_SAME_SIDE", "0")
    assert screening_from_env() == dict(max_per_hour=30, same_side_min=None)
    monkeypatch.setenv("DMD2_FLAG_SAME_SIDE", "-1")
    with pytest.raises(ValueError, match="DMD2_FLAG_SAME_SIDE"):
        screening_from_env()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    s = VoteStore(tmp_path / "votes.sqlite", max_votes=None)
    yield s
    s.close()


def test_the_leaderboard_leaves_out_flagged_voters_and_says_so(store):
    for i in range(30):                                    # a bot: always A, 30 times in 30 s
        store.record(f"bot{i}", "m/weak", "m/strong", "p", i, "a", "session:bot", now=1000.0 + i)
    for i in range(12):                                    # people, mostly for the strong model
        store.record(f"h{i}", "m/strong", "m/weak", "p", i, "a" if i % 4 else "b", f"session:h{i % 3}",
                     now=1000.0 + 300 * i)
    cache = LeaderboardCache(rounds=0, in_process=True, screening=dict(max_per_hour=120, same_side_min=20))
    table, _, _ = cache.view(store, ["m/strong", "m/weak"])
    assert list(table["Model"]) == ["strong", "weak"] and list(table["Battles"]) == [12, 12]
    assert cache.exclusion_note() == ("Counted 12 of 42 votes; excluded 30: 30 from 1 voter with the same side "
                                      "in every vote (at least 20 votes).")
    unscreened = LeaderboardCache(rounds=0, in_process=True, screening=OFF)
    table, _, _ = unscreened.view(store, ["m/strong", "m/weak"])
    assert list(table["Model"]) == ["weak", "strong"] and list(table["Battles"]) == [42, 42]   # the bot wins
    assert unscreened.exclusion_note() == "All 42 votes counted; none excluded."


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return make_tiny_students(tmp_path_factory.mktemp("models"))


def test_a_vote_after_the_reveal_is_refused_and_not_counted(tiny_models, store):
    """Votes exist only for battles whose names were hidden: the vote reveals them, and the battle takes
    no second vote (from the same voter or anyone else), so nothing voted after the reveal counts."""
    arena = Arena(tiny_models, store, rng=np.random.default_rng(0))
    token = arena.new_round().token
    verdict = arena.vote(token, "a", ["session:s1"])
    assert verdict.model_a in verdict.message                       # revealed
    for outcome, voter in (("b", ["session:s1"]), ("a", ["session:other"])):
        with pytest.raises(VoteRejected) as e:
            arena.vote(token, outcome, voter)
        assert e.value.reason == "already_voted"
    assert len(store) == 1 and sum(r["battles"] for r in leaderboard(store.votes(), rounds=0)) == 2


def test_exports_keep_hashed_ids_only(tiny_models, store, tmp_path):
    arena = Arena(tiny_models, store, rng=np.random.default_rng(1))
    ids = ["hf:6512345abcdef", "session:sess-XYZ", "address:203.0.113.77"]
    arena.vote(arena.new_round().token, "a", ids[1:], user="6512345abcdef")
    arena.vote(arena.new_round().token, "b", ids[1:])
    raw = ["6512345abcdef", "sess-XYZ", "203.0.113.77", "hf:", "session:", "address:"]
    for fmt in ("csv", "jsonl"):
        path = export_votes(store, fmt, folder=tmp_path)
        text = path.read_text()
        assert not [r for r in raw if r in text], fmt
        rows = (list(csv.DictReader(open(path))) if fmt == "csv" else
                [json.loads(line) for line in text.splitlines()])
        assert [r["client_hash"] for r in rows] == [store.hash_client(ids[0]), store.hash_client(ids[1])]
        assert all(len(r["client_hash"]) == 64 and int(r["client_hash"], 16) >= 0 for r in rows)


def test_live_leaderboard_shows_the_exclusion_line(tiny_models, store, tmp_path):
    import gradio as gr
    from gradio_client import Client

    from dmd2.ui.leaderboard import build_leaderboard_tab

    for i in range(25):
        store.record(f"bot{i}", "m/x", "m/y", "p", i, "b", "session:bot", now=5000.0 + i)
    store.record("h0", "m/x", "m/y", "p", 0, "a", "session:h", now=5000.0)
    with gr.Blocks() as demo:
        build_leaderboard_tab(["m/x", "m/y"], lambda: store,
                              cache=LeaderboardCache(rounds=0, screening=dict(max_per_hour=120, same_side_min=20)))
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        table, _plot = client.predict(api_name="/leaderboard")
        assert [row[4] for row in table["data"]] == [1, 1]                  # the Battles column: the bot is out
        line = client.predict(api_name="/leaderboard_exclusions")
        assert line == ("Counted 1 of 26 votes; excluded 25: 25 from 1 voter with the same side in every vote "
                        "(at least 20 votes).")
        exported = open(client.predict(api_name="/export_jsonl")).read()
        assert "session:" not in exported and store.hash_client("session:bot") in exported
