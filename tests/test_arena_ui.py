"""Arena and Leaderboard tabs: the pure functions behind them, and the real app on localhost via gradio_client."""

from __future__ import annotations

import os
import types

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest

from conftest import make_tiny_students, served, tiny_pixel_unet, write_broken_model
from dmd2 import registry
from dmd2.arena import BattleBook, VoteStore, read_csv, read_jsonl
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.arena import (IMAGES_PER_SIDE, Arena, VoteRejected, client_ids, parse_class, parse_outcome)
from dmd2.ui.widgets import DISPLAY_SCALE, make_grid
from dmd2.ui.leaderboard import COLUMNS, export_votes, leaderboard_plot, leaderboard_table


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny random students (1 and 2 steps: fast rounds) and a folder that fails to load."""
    root = tmp_path_factory.mktemp("models")
    students = make_tiny_students(root)
    return students + [str(write_broken_model(root / "broken", like=root / "tiny-1step"))]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    s = VoteStore(tmp_path / "votes.sqlite")
    yield s
    s.close()


@pytest.fixture
def arena(tiny_models, store):
    return Arena(tiny_models[:2], store, rng=np.random.default_rng(0))


# --- pure functions ----------------------------------------------------------------------

def test_parse_class_and_outcome():
    rng = np.random.default_rng(0)
    drawn = {parse_class(v, 10, rng) for v in ["random", None, " Random ", ""] * 10}
    assert drawn <= set(range(10)) and len(drawn) > 3
    assert parse_class("3", 10, rng) == 3 and parse_class(7, 10, rng) == 7 and parse_class(2.0, 10, rng) == 2
    for bad in (10, -1, "x", 1.5, True):
        with pytest.raises(ValueError, match="class must be 'random' or an integer 0..9"):
            parse_class(bad, 10, rng)
    assert parse_outcome(" A ") == "a" and parse_outcome("both_bad") == "both_bad"
    for bad in ("left", None, ["a"]):
        with pytest.raises(VoteRejected, match="outcome must be one of a, b, tie, both_bad") as e:
            parse_outcome(bad)
        assert e.value.reason == "bad_outcome"


def fake_request(session=None, host="10.0.0.1", forwarded=None, username=None):
    """What the vote handlers read of a gr.Request: session_hash, client.host, headers, username."""
    headers = {"x-forwarded-for": forwarded} if forwarded else {}
    return types.SimpleNamespace(session_hash=session, client=types.SimpleNamespace(host=host) if host else None,
                                 headers=headers, username=username)


def test_client_ids_are_session_address_and_user(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert client_ids(fake_request("s1")) == ["session:s1", "address:10.0.0.1"]
    assert client_ids(fake_request("s1", username="ada")) == ["session:s1", "address:10.0.0.1", "user:ada"]
    assert client_ids(fake_request(None)) == ["address:10.0.0.1"]
    assert client_ids(fake_request(None, host=None)) == client_ids(None) == ["anonymous"]
    # IPv6: the /64 a subscriber gets is one address; an IPv4-mapped address is its IPv4
    assert client_ids(fake_request(host="2001:db8:1:2:aaaa::1"))[0] == "address:2001:db8:1:2::/64"
    assert client_ids(fake_request(host="::ffff:192.0.2.5"))[0] == "address:192.0.2.5"


def test_x_forwarded_for_counts_only_behind_a_space_proxy(monkeypatch):
    """Off a Space a client reaches the app directly and may write any x-forwarded-for: it is ignored."""
    forged = fake_request("s1", host="10.0.0.1", forwarded="203.0.113.7, 10.0.0.9")
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert client_ids(forged) == ["session:s1", "address:10.0.0.1"]
    monkeypatch.setenv("SPACE_ID", "user/space")                  # behind the Space's proxy: the first entry
    assert client_ids(forged) == ["session:s1", "address:203.0.113.7"]
    assert client_ids(fake_request("s1", host="10.0.0.1")) == ["session:s1", "address:10.0.0.1"]   # no header


def test_a_vote_flood_with_fresh_sessions_is_refused_per_address_and_user(tiny_models, tmp_path, monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    with VoteStore(tmp_path / "limited.sqlite", max_votes=3, window_s=60) as store:
        arena = Arena(tiny_models[:2], store, rng=np.random.default_rng(2))
        for k in range(3):
            arena.vote(arena.new_round().token, "a", client_ids(fake_request(f"flood-{k}", host="192.0.2.1")))
        with pytest.raises(VoteRejected, match="Too many votes") as e:
            arena.vote(arena.new_round().token, "a", client_ids(fake_request("flood-3", host="192.0.2.1")))
        assert e.value.reason == "rate_limited"
        for k in range(3):                                    # the same logged-in user from fresh addresses
            arena.vote(arena.new_round().token, "a",
                       client_ids(fake_request(f"ada-{k}", host=f"198.51.100.{k}", username="ada")))
        with pytest.raises(VoteRejected, match="Too many votes"):
            arena.vote(arena.new_round().token, "a",
                       client_ids(fake_request("ada-3", host="198.51.100.3", username="ada")))
        arena.vote(arena.new_round().token, "a", client_ids(fake_request("other", host="198.51.100.3")))
        assert len(store) == 7


def test_new_round_same_class_and_seed_on_both_sides(arena, tiny_models):
    r = arena.new_round("3")
    assert r.votable and r.prompt == "3" and "Class **3**" in r.message
    battle = arena.book.verify(r.token)                      # the server's copy: names stay here
    assert {battle["model_a"], battle["model_b"]} == set(tiny_models[:2])
    assert "tiny" not in r.message and "tiny" not in r.token
    for name, image in ((battle["model_a"], r.image_a), (battle["model_b"], r.image_b)):
        out = registry.load(name).generate([3] * IMAGES_PER_SIDE, battle["seed"], autocast=arena.bf16)   # as the arena samples
        assert np.array_equal(image, make_grid(out.images, scale=DISPLAY_SCALE)[..., 0])
    assert not np.array_equal(r.image_a, r.image_b)           # 1 step vs 2 steps differ


def test_new_round_shuffles_sides_and_draws_classes_and_seeds(arena):
    rounds = [arena.new_round() for _ in range(8)]
    battles = [arena.book.verify(r.token) for r in rounds]
    assert len({b["model_a"] for b in battles}) == 2          # each model appears on side A
    assert len({b["seed"] for b in battles}) == 8
    assert len({r.prompt for r in rounds}) > 1 and all(r.prompt in map(str, range(10)) for r in rounds)


def test_vote_records_once_and_reveals_names(arena, store):
    r = arena.new_round("5")
    v = arena.vote(r.token, "b", "session:x")
    battle = arena.book.verify(r.token)
    assert {v.model_a, v.model_b} == {"tiny-1step", "tiny-2step"}           # display names, no paths
    assert v.model_a == os.path.basename(battle["model_a"]) and v.outcome == "b" and v.prompt == "5"
    assert f"**A** was **{v.model_a}**" in v.message and f"seed {battle['seed']}" in v.message
    [row] = store.votes()
    assert (row["battle_id"], row["model_a"], row["model_b"], row["outcome"], row["prompt"], row["seed"]) == \
        (r.token.split(".")[0], battle["model_a"], battle["model_b"], "b", "5", battle["seed"])
    assert "session:x" not in row["client_hash"]

    with pytest.raises(VoteRejected, match="already voted") as e:             # replay, even as someone else
        arena.vote(r.token, "a", "session:y")
    assert e.value.reason == "already_voted" and len(store) == 1


def test_forged_tokens_and_bad_outcomes_are_rejected(arena, store):
    r = arena.new_round()
    battle_id, signature = r.token.split(".")
    forged = [f"{battle_id}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}",   # tampered signature
              f"{'x' * len(battle_id)}.{signature}",                                      # unknown battle
              "no-dot-at-all", "", None]
    for token in forged:
        with pytest.raises(VoteRejected, match="Vote rejected") as e:
            arena.vote(token, "a", "c")
        assert e.value.reason == "invalid_token"
    with pytest.raises(VoteRejected, match="outcome"):
        arena.vote(r.token, "left", "c")
    assert len(store) == 0
    other = Arena(arena.models, store, book=BattleBook(secret=b"another server"))
    with pytest.raises(VoteRejected, match="unknown battle"):                   # a token from another server
        other.vote(r.token, "a", "c")
    arena.vote(r.token, "tie", "c")                            # the genuine token still works
    assert [v["outcome"] for v in store.votes()] == ["tie"]


def test_rate_limit_says_when_to_retry(tiny_models, tmp_path):
    with VoteStore(tmp_path / "limited.sqlite", max_votes=1, window_s=60) as store:
        arena = Arena(tiny_models[:2], store, rng=np.random.default_rng(1))
        arena.vote(arena.new_round().token, "a", "session:me")
        with pytest.raises(VoteRejected, match=r"at most 1 per 60 s\. Try again in \d+ s") as e:
            arena.vote(arena.new_round().token, "a", "session:me")
        assert e.value.reason == "rate_limited" and 0 < e.value.retry_after_s <= 60
        arena.vote(arena.new_round().token, "a", "session:someone-else")
        assert len(store) == 2


def test_a_side_that_fails_cannot_be_voted_on(tiny_models, store):
    arena = Arena([tiny_models[0], tiny_models[2]], store, rng=np.random.default_rng(0))
    r = arena.new_round("1")
    assert not r.votable and r.token is None
    assert r.message.startswith("This round cannot be voted on: side ") and "failed to generate" in r.message
    assert (r.image_a is None) != (r.image_b is None)         # the working side still shows its digits
    assert len(arena.book) == 0
    with pytest.raises(ValueError, match="at least two models"):
        Arena(tiny_models[:1], store).new_round()
    with pytest.raises(ValueError, match="class must be"):
        Arena(tiny_models[:2], store).new_round("12")


VOTES = [dict(model_a="m/strong", model_b="m/weak", outcome="a")] * 3 + \
        [dict(model_a="m/weak", model_b="m/strong", outcome="tie"), dict(model_a="m/weak", model_b="m/strong",
                                                                         outcome="both_bad")]


def test_leaderboard_table_and_plot():
    table = leaderboard_table(VOTES, ["m/strong", "m/weak", "m/idle"], rounds=50)
    assert list(table.columns) == COLUMNS
    assert list(table["Model"]) == ["strong", "weak", "idle"]           # best first, unvoted last
    strong, weak, idle = (table.iloc[i] for i in range(3))
    assert strong["Rating"] > 1000 > weak["Rating"] and strong["Rank"] == 1
    assert strong[["Battles", "Wins", "Losses", "Ties", "Both bad"]].tolist() == [5, 3, 0, 1, 1]
    assert (weak["Wins"], weak["Losses"]) == (0, 3)
    lo, hi = map(float, strong["95% CI"].split(" to "))
    assert lo <= strong["Rating"] <= hi
    assert idle["Battles"] == 0 and idle["95% CI"] == ""
    assert table["Rating"].isna().tolist() == [False, False, True]

    fig = leaderboard_plot(VOTES, ["m/strong", "m/weak", "m/idle"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["strong", "weak", "idle"]
    assert sorted(t.get_text() for t in ax.texts) == ["20%", "80%"]      # (3 wins + 2 halves) / 5 battles


def test_export_votes_round_trips(store, tmp_path):
    for i, outcome in enumerate(["a", "tie"]):
        store.record(f"b{i}", "m/one", "m/two", str(i), i, outcome, "c", now=100.0 + i)
    csv_path = export_votes(store, "csv", tmp_path)
    jsonl_path = export_votes(store, "jsonl")                  # default: a fresh temp folder
    assert csv_path.suffix == ".csv" and jsonl_path.suffix == ".jsonl" and jsonl_path.parent != tmp_path
    assert read_csv(csv_path) == read_jsonl(jsonl_path) == store.votes()
    with pytest.raises(ValueError, match="export format"):
        export_votes(store, "xlsx", tmp_path)


# --- the real app on localhost -----------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_models, tmp_path_factory):
    """The real app with the two tiny students and a fresh votes DB; yields (url, votes path, downloads)."""
    from dmd2.ui.app import build_app

    votes = tmp_path_factory.mktemp("votes") / "votes.sqlite"
    demo = build_app(tiny_models[:2], votes_path=votes)
    with served(demo) as url:
        yield url, votes, tmp_path_factory.mktemp("downloads")


def new_client(app):
    from gradio_client import Client

    url, _, downloads = app
    return Client(url, verbose=False, download_files=str(downloads))


@pytest.fixture(scope="module")
def client(app):
    return new_client(app)


def db_votes(app) -> list[dict]:
    with VoteStore(app[1]) as store:          # a second connection, as another process would open it
        return store.votes()


def new_round(client, label="random"):
    # The vote buttons are outputs too, but gradio_client leaves buttons out of the results.
    token, image_a, image_b, info, reveal = client.predict(label, api_name="/new_round")
    assert reveal == ""
    return token, image_a, image_b, info


def battles(client) -> int:
    table, _plot = client.predict(api_name="/leaderboard")
    assert table["headers"] == COLUMNS
    return sum(row[COLUMNS.index("Battles")] for row in table["data"]) // 2     # each battle counts twice


def test_app_leaderboard_before_any_vote(app, client):
    table, plot = client.predict(api_name="/leaderboard")
    assert [row[1:4] for row in table["data"]] == [["tiny-1step", None, ""], ["tiny-2step", None, ""]]
    assert plot is not None and app[1].exists() and db_votes(app) == []     # the DB opens on first use


def test_app_round_vote_reveal_and_replay(app, client):
    from gradio_client.exceptions import AppError
    from PIL import Image

    before = len(db_votes(app))
    token, image_a, image_b, info = new_round(client, "4")
    assert "Class **4**" in info and "tiny" not in info
    assert np.asarray(Image.open(image_a)).shape == np.asarray(Image.open(image_b)).shape == (2 * 128 + 2,) * 2

    verdict = client.predict(token, "a", api_name="/vote")
    assert {verdict["model_a"], verdict["model_b"]} == {"tiny-1step", "tiny-2step"}
    assert verdict["outcome"] == "a" and verdict["prompt"] == "4" and "Vote recorded" in verdict["message"]
    rows = [v for v in db_votes(app) if v["battle_id"] == token.split(".")[0]]
    assert len(rows) == 1 and rows[0]["outcome"] == "a" and len(db_votes(app)) == before + 1

    for outcome in ("a", "b"):                                 # the same token again: refused, counted once
        with pytest.raises(AppError, match="already voted"):
            client.predict(token, outcome, api_name="/vote")
    assert len(db_votes(app)) == before + 1


def test_app_rejects_forged_tokens_and_bad_outcomes(app, client):
    from gradio_client.exceptions import AppError

    before = len(db_votes(app))
    token = new_round(client)[0]
    battle_id, signature = token.split(".")
    tampered = f"{battle_id}.{'A' * len(signature)}"
    for forged, message in ((tampered, "signature does not match"), ("abc.def", "unknown battle"),
                            ("garbage", "malformed")):
        with pytest.raises(AppError, match=message):
            client.predict(forged, "a", api_name="/vote")
    with pytest.raises(AppError, match="outcome must be one of"):
        client.predict(token, "left", api_name="/vote")
    assert len(db_votes(app)) == before
    assert client.predict(token, "tie", api_name="/vote")["outcome"] == "tie"
    assert len(db_votes(app)) == before + 1


def test_app_buttons_vote_with_the_session_token(app, client):
    """The browser path: the token lives in the session's gr.State; another session has none."""
    from gradio_client.exceptions import AppError

    token = new_round(client)[0]
    reveal = client.predict(api_name="/vote_button_both_bad")
    assert reveal.startswith("Vote recorded (both bad). **A** was **tiny-")
    assert [v["outcome"] for v in db_votes(app) if v["battle_id"] == token.split(".")[0]] == ["both_bad"]
    with pytest.raises(AppError, match="already voted"):                  # double click
        client.predict(api_name="/vote_button_a")
    with pytest.raises(AppError, match="press New round first"):
        new_client(app).predict(api_name="/vote_button_a")


def test_app_leaderboard_counts_votes_and_exports(app, client):
    before = battles(client)
    for outcome in ("a", "b"):
        client.predict(new_round(client)[0], outcome, api_name="/vote")
    assert battles(client) == before + 2 == len(db_votes(app))
    table = client.predict(api_name="/leaderboard")[0]
    assert sorted(row[1] for row in table["data"]) == ["tiny-1step", "tiny-2step"]
    assert all(row[2] is not None for row in table["data"])                   # both rated now

    assert read_csv(client.predict(api_name="/export_csv")) == db_votes(app)
    assert read_jsonl(client.predict(api_name="/export_jsonl")) == db_votes(app)


def test_app_refuses_a_flood_with_fresh_sessions_from_one_address(tiny_models, tmp_path, monkeypatch):
    """The live Arena tab, three votes a minute: a script that starts a new session for every vote is
    refused after the third from its address; on a Space that address is x-forwarded-for's first entry."""
    import gradio as gr
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from dmd2.ui.arena import build_arena_tab

    store = VoteStore(tmp_path / "votes.sqlite", max_votes=3, window_s=60)
    with gr.Blocks() as demo:
        build_arena_tab(Arena(tiny_models[:2], store, rng=np.random.default_rng(3)))

    def vote(client, forwarded=None):
        """One round voted from a fresh session (sending `forwarded` as x-forwarded-for); the error or None."""
        token = client.predict("random", api_name="/new_round")[0]
        client.reset_session()
        if forwarded:
            client.headers["x-forwarded-for"] = forwarded
        try:
            client.predict(token, "a", api_name="/vote")
        except AppError as e:
            return str(e)
        return None

    try:
        with served(demo) as url:
            script = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
            monkeypatch.setenv("SPACE_ID", "user/space")        # behind the Space's proxy
            # The entries after the first are proxies' (uvicorn, trusting its loopback peer, would take the
            # last one as the client): only the first is the client's own address.
            assert [vote(script, f"203.0.113.7, 10.0.0.{k}") for k in range(3)] == [None] * 3
            assert "Too many votes: at most 3 per 60 s" in vote(script, "203.0.113.7, 10.0.0.3")
            assert vote(script, "198.51.100.9, 10.0.0.1") is None          # another client still votes

            monkeypatch.delenv("SPACE_ID")                                 # no proxy: the connection's address
            plain = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
            assert [vote(plain) for _ in range(3)] == [None] * 3
            assert "Too many votes" in vote(plain)                         # all from 127.0.0.1
            assert len(store) == 7
    finally:
        store.close()


def test_votes_path_from_env_and_a_bad_votes_flag_fails_early(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from dmd2.arena import default_votes_path

    monkeypatch.delenv("DMD2_VOTES", raising=False)
    assert default_votes_path(persistent=tmp_path / "no-data") == Path("data") / "votes.sqlite"
    (tmp_path / "data-volume").mkdir()                          # a Space's persistent storage, mounted at /data
    assert default_votes_path(persistent=tmp_path / "data-volume") == tmp_path / "data-volume" / "votes.sqlite"
    (tmp_path / "data-volume").chmod(0o500)
    if not os.access(tmp_path / "data-volume", os.W_OK):        # root may write anyway
        assert default_votes_path(persistent=tmp_path / "data-volume") == Path("data") / "votes.sqlite"
    (tmp_path / "data-volume").chmod(0o700)
    monkeypatch.setenv("DMD2_VOTES", str(tmp_path / "v.sqlite"))
    assert default_votes_path(persistent=tmp_path / "data-volume") == tmp_path / "v.sqlite"

    (tmp_path / "a-file").write_text("")
    bad = tmp_path / "a-file" / "votes.sqlite"                  # parent is a file: cannot be created, even as root
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "app.py"), "--votes", str(bad), "--model", "x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"cannot open the votes database {bad}" in r.stderr


def test_arena_rounds_use_bf16_when_asked_and_say_so(monkeypatch, tmp_path):
    from dmd2 import registry
    from dmd2.ui.arena import bf16_default

    monkeypatch.setenv("DMD2_ARENA_BF16", "0")
    assert bf16_default() is False
    monkeypatch.setenv("DMD2_ARENA_BF16", "1")
    assert bf16_default() is True
    monkeypatch.setenv("DMD2_ARENA_BF16", "maybe")
    with pytest.raises(ValueError, match="DMD2_ARENA_BF16"):
        bf16_default()
    monkeypatch.delenv("DMD2_ARENA_BF16")
    seen = []
    real = registry.LoadedModel.generate

    def recording(self, *args, autocast=False, **kwargs):
        seen.append(autocast)
        return real(self, *args, autocast=autocast, **kwargs)
    monkeypatch.setattr(registry.LoadedModel, "generate", recording)
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, tmp_path / "a")
    save_pixel_unet(unet, tmp_path / "b", timesteps=[999])
    with VoteStore(tmp_path / "votes.sqlite") as store:
        for bf16 in (True, False):
            r = Arena([str(tmp_path / "a"), str(tmp_path / "b")], store, bf16=bf16).new_round("1")
            assert r.votable and seen[-2:] == [bf16, bf16]              # both sides alike
