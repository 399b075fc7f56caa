"""Hugging Face login in the Arena (issue 15, "One vote per person"): login-required voting, the user id as
the voter's id, the daily cap. Without the Hub: a profile is injected the way Gradio injects it (from the
session's oauth_info, by the handler's `gr.OAuthProfile | None` type hint), and the live app logs in through
Gradio's own mocked OAuth routes with `gradio.oauth._get_mocked_oauth_info` replaced."""

from __future__ import annotations

import os
import time
import types

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest

from conftest import make_tiny_students, served
from dmd2.arena import VoteStore
from dmd2.ui.arena import Arena, VoteRejected, build_arena_tab, client_ids, require_login_from_env, user_id

USERINFO = {"sub": "6512345abcdef", "name": "Ada Lovelace", "preferred_username": "ada",
            "profile": "https://huggingface.co/ada", "picture": "https://huggingface.co/ada.png"}


def oauth_info(userinfo=USERINFO) -> dict:
    """What Gradio keeps in the session after a login (the shape of oauth._get_mocked_oauth_info)."""
    return {"access_token": "mock-token", "token_type": "bearer", "expires_in": 3600, "scope": "openid profile",
            "expires_at": int(time.time()) + 3600, "userinfo": dict(userinfo)}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return make_tiny_students(tmp_path_factory.mktemp("models"))


@pytest.fixture
def mock_login(monkeypatch):
    """Off a Space Gradio mocks the login with the machine's own Hugging Face account (a whoami call):
    replace that account with USERINFO, as projects testing Gradio's OAuth do. Its session cookie needs
    itsdangerous (gradio[oauth], in requirements.txt: a missing one fails here, it is not skipped)."""
    import itsdangerous  # noqa: F401
    import gradio.oauth

    for var in ("SPACE_ID", "SYSTEM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", oauth_info)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    s = VoteStore(tmp_path / "votes.sqlite", max_votes=None)
    yield s
    s.close()


def test_settings_from_the_environment(monkeypatch, tiny_models, store):
    monkeypatch.delenv("DMD2_REQUIRE_LOGIN", raising=False)
    monkeypatch.delenv("DMD2_DAILY_VOTES", raising=False)
    a = Arena(tiny_models, store)
    assert not a.require_login and a.daily_votes == 200
    monkeypatch.setenv("DMD2_REQUIRE_LOGIN", "1")
    monkeypatch.setenv("DMD2_DAILY_VOTES", "7")
    a = Arena(tiny_models, store)
    assert a.require_login and a.daily_votes == 7
    monkeypatch.setenv("DMD2_DAILY_VOTES", "0")
    assert Arena(tiny_models, store).daily_votes is None
    monkeypatch.setenv("DMD2_REQUIRE_LOGIN", "maybe")
    with pytest.raises(ValueError, match="DMD2_REQUIRE_LOGIN"):
        require_login_from_env()


def test_user_id_and_client_ids():
    import gradio as gr

    profile = gr.OAuthProfile(USERINFO)                    # as Gradio builds it from the session's userinfo
    assert profile.username == "ada" and user_id(profile) == "6512345abcdef" and user_id(None) is None
    assert user_id(gr.OAuthProfile({k: v for k, v in USERINFO.items() if k != "sub"})) == "ada"
    request = types.SimpleNamespace(session_hash="s1", client=types.SimpleNamespace(host="203.0.113.5"),
                                    headers={}, username=None)
    assert client_ids(request, "u1") == ["hf:u1", "session:s1", "address:203.0.113.5"]
    assert client_ids(request) == ["session:s1", "address:203.0.113.5"]
    assert client_ids(None, "u1") == ["hf:u1"]


def test_login_required_refuses_a_logged_out_vote(tiny_models, store):
    arena = Arena(tiny_models, store, rng=np.random.default_rng(0), require_login=True)
    token = arena.new_round().token
    with pytest.raises(VoteRejected, match="Log in with Hugging Face") as e:
        arena.vote(token, "a", ["session:s1"])
    assert e.value.reason == "login_required" and len(store) == 0
    arena.vote(token, "a", ["session:s1"], user="u1")       # the same battle, logged in: recorded
    (row,) = store.votes()
    assert row["client_hash"] == store.hash_client("hf:u1")  # the user's id, hashed with the store's salt
    assert "u1" not in str(row)


def test_daily_cap_per_user_and_no_cap_without_login(tiny_models, store):
    arena = Arena(tiny_models, store, rng=np.random.default_rng(1), daily_votes=2)
    for _ in range(2):
        arena.vote(arena.new_round().token, "b", ["session:s1"], user="u1")
    with pytest.raises(VoteRejected, match="Daily vote cap reached: at most 2 votes per user") as e:
        arena.vote(arena.new_round().token, "b", ["session:s2"], user="u1")     # a fresh session: still u1
    assert e.value.reason == "daily_cap" and 0 < e.value.retry_after_s <= 24 * 3600
    arena.vote(arena.new_round().token, "b", ["session:s1"], user="u2")         # another user votes
    for _ in range(3):                                       # logged out: only the per-client limits
        arena.vote(arena.new_round().token, "a", ["session:s9"])
    assert len(store) == 6


def test_daily_cap_is_a_rolling_day(store):
    for i in range(3):
        store.record(f"b{i}", "x", "y", "p", 0, "a", ["hf:u1"], now=1000.0 + i, daily_limit=3)
    from dmd2.arena.store import DailyCapReached

    with pytest.raises(DailyCapReached) as e:
        store.record("b3", "x", "y", "p", 0, "a", ["hf:u1"], now=2000.0, daily_limit=3)
    assert e.value.retry_after_s == pytest.approx(1000.0 + 24 * 3600 - 2000.0)
    store.record("b3", "x", "y", "p", 0, "a", ["hf:u1"], now=1000.5 + 24 * 3600, daily_limit=3)   # b0 left the day


def test_handler_with_a_profile_injected_as_gradio_does(tiny_models, store, mock_login):
    """The Arena tab's /vote handler, its OAuthProfile filled in by gradio.helpers.special_args from a
    request whose session holds oauth_info (what the login callback stores)."""
    import gradio as gr
    from gradio.helpers import special_args

    arena = Arena(tiny_models, store, rng=np.random.default_rng(2), require_login=True)
    with gr.Blocks():
        tab = build_arena_tab(arena)
    assert tab["login"] is not None                      # login required: the tab has a LoginButton

    def request(session):
        return types.SimpleNamespace(scope={"session": session}, session_hash="s1", username=None, headers={},
                                     client=types.SimpleNamespace(host="203.0.113.5"))

    token = arena.new_round().token
    inputs, *_ = special_args(tab["vote"], [token, "a"], request({}))     # logged out: profile None
    assert inputs[3] is None
    with pytest.raises(gr.Error, match="Log in with Hugging Face"):
        tab["vote"](*inputs)

    inputs, *_ = special_args(tab["vote"], [token, "a"], request({"oauth_info": oauth_info()}))
    assert isinstance(inputs[3], gr.OAuthProfile) and inputs[3].username == "ada"
    verdict = tab["vote"](*inputs)
    assert verdict["outcome"] == "a" and "Vote recorded" in verdict["message"]
    assert store.votes()[0]["client_hash"] == store.hash_client("hf:6512345abcdef")

    # the button path: the same injection, directly with a profile built from a dict
    token = arena.new_round().token
    out = tab["cast"](token, "b", request({}), gr.OAuthProfile(USERINFO))
    assert "Vote recorded" in out[0] and len(store) == 2


def test_no_login_button_unless_required_or_set_up(tiny_models, store, monkeypatch, mock_login):
    import gradio as gr

    monkeypatch.delenv("OAUTH_CLIENT_ID", raising=False)
    with gr.Blocks() as demo:
        assert build_arena_tab(Arena(tiny_models, store, require_login=False))["login"] is None
    assert not demo.expects_oauth                        # no OAuth routes, nothing asks for a local HF login
    monkeypatch.setenv("OAUTH_CLIENT_ID", "space-oauth-app")     # a Space with hf_oauth: true
    with gr.Blocks() as demo:
        assert build_arena_tab(Arena(tiny_models, store, require_login=False))["login"] is not None
    assert demo.expects_oauth


# --- the live app through gradio_client -------------------------------------------------------------


def login_cookie(url: str) -> str:
    """Log in through Gradio's (mocked, off a Space) OAuth routes; the signed session cookie's value.
    The cookie is https-only, so it is read from the response and sent by hand."""
    import httpx

    r = httpx.get(url + "login/huggingface", follow_redirects=False)
    assert r.status_code in (302, 307), r.text
    r = httpx.get(url.rstrip("/") + r.headers["location"], follow_redirects=False)
    assert r.status_code in (302, 307) and "session" in r.cookies
    return r.cookies["session"]


def test_live_app_login_required_user_id_and_daily_cap(tiny_models, tmp_path, monkeypatch, mock_login):
    import gradio as gr
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    monkeypatch.delenv("DMD2_ARENA_SALT", raising=False)
    store = VoteStore(tmp_path / "votes.sqlite", max_votes=None)
    with gr.Blocks() as demo:
        build_arena_tab(Arena(tiny_models, store, rng=np.random.default_rng(3), require_login=True, daily_votes=2))
    try:
        with served(demo) as url:
            downloads = str(tmp_path / "dl")
            anonymous = Client(url, verbose=False, download_files=downloads)
            token = anonymous.predict("random", api_name="/new_round")[0]
            with pytest.raises(AppError, match="Log in with Hugging Face"):
                anonymous.predict(token, "a", api_name="/vote")
            assert len(store) == 0

            user = Client(url, verbose=False, download_files=downloads,
                          headers={"Cookie": f"session={login_cookie(url)}"})
            verdict = user.predict(token, "a", api_name="/vote")        # the battle the logged-out vote left
            assert "Vote recorded" in verdict["message"]
            assert store.votes()[0]["client_hash"] == store.hash_client("hf:6512345abcdef")

            user.predict(user.predict("random", api_name="/new_round")[0], "b", api_name="/vote")
            user.reset_session()                                          # a fresh session, the same user
            with pytest.raises(AppError, match="Daily vote cap reached: at most 2"):
                user.predict(user.predict("random", api_name="/new_round")[0], "b", api_name="/vote")
            assert len(store) == 2 and {v["client_hash"] for v in store.votes()} == {store.hash_client("hf:6512345abcdef")}
    finally:
        store.close()


def test_login_required_without_gradio_oauth_fails_clearly(tiny_models, store, monkeypatch):
    import gradio as gr

    import dmd2.ui.arena as arena_ui

    monkeypatch.setattr(arena_ui, "oauth_missing", lambda: ["itsdangerous"])
    with gr.Blocks():
        with pytest.raises(RuntimeError, match=r"DMD2_REQUIRE_LOGIN=1 needs .*itsdangerous.*gradio\[oauth\]"):
            build_arena_tab(Arena(tiny_models, store, require_login=True))
    with gr.Blocks() as demo:                            # optional login: the tab goes on without the button
        assert build_arena_tab(Arena(tiny_models, store, require_login=False), login=True)["login"] is None
    assert not demo.expects_oauth
