"""The app's queue and cache settings: sized limits, generation in its own group, a full queue that says
"busy", and Gradio's file cache cleaned."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import threading
import time
from pathlib import Path

import pytest

from conftest import served, tiny_pixel_unet
from dmd2.families.pixel import save_pixel_unet

HANG_GUARD_S = 60       # bounded waits for a server-side condition, not timing assertions


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, root / "tiny-teacher")
    save_pixel_unet(unet, root / "tiny-student", timesteps=[999])
    return [str(root / "tiny-teacher"), str(root / "tiny-student")]


def groups(demo) -> dict[str, tuple]:
    """api name -> (concurrency group, its limit) of every named event."""
    return {fn.api_name: (fn.concurrency_id, fn.concurrency_limit) for fn in demo.fns.values() if fn.api_name}


def test_queue_is_sized_and_votes_and_leaderboard_do_not_wait_behind_generation(tiny_models, tmp_path):
    from dmd2.ui.app import ARENA_ROUNDS_PER_SLOT, VOTE_CONCURRENCY, build_app

    demo = build_app(tiny_models, votes_path=tmp_path / "v.sqlite", concurrency=3, queue_size=5)
    assert demo._queue.max_size == 5                     # the Queue object Blocks.queue made
    g = groups(demo)
    for name in ("compare", "compare_more"):           # one pool of generation slots
        assert g[name] == ("generate", 3), name
    assert g["new_round"] == ("arena", 3 * ARENA_ROUNDS_PER_SLOT)    # batched: its Batcher has the 3 slots
    for name in ("vote", "vote_button_a", "vote_button_b", "vote_button_tie", "vote_button_both_bad"):
        assert g[name] == ("votes", VOTE_CONCURRENCY), name
    assert g["leaderboard"][0] == "leaderboard" and g["leaderboard"][1] >= 2
    assert g["export_csv"][0] not in ("generate", "votes", "leaderboard")


def test_defaults_and_environment(tiny_models, tmp_path, monkeypatch):
    from dmd2.ui.app import (ARENA_ROUNDS_PER_SLOT, DELETE_CACHE, QUEUE_PER_WORKER, build_app, default_concurrency,
                             describe_queue)

    for name in ("DMD2_CONCURRENCY", "DMD2_QUEUE_SIZE", "DMD2_DELETE_CACHE"):
        monkeypatch.delenv(name, raising=False)
    demo = build_app(tiny_models, votes_path=tmp_path / "v.sqlite")
    assert demo._queue.max_size == QUEUE_PER_WORKER * default_concurrency()
    assert demo.delete_cache == DELETE_CACHE and groups(demo)["new_round"] == \
        ("arena", ARENA_ROUNDS_PER_SLOT * default_concurrency())

    monkeypatch.setenv("DMD2_CONCURRENCY", "3")
    monkeypatch.setenv("DMD2_QUEUE_SIZE", "7")
    monkeypatch.setenv("DMD2_DELETE_CACHE", "60,120")
    demo = build_app(tiny_models, votes_path=tmp_path / "v.sqlite")
    assert (demo._queue.max_size, demo.delete_cache, groups(demo)["compare"]) == (7, (60, 120), ("generate", 3))
    assert demo.queue_settings == dict(concurrency=3, queue_size=7, delete_cache=(60, 120),
                                       arena_rounds=3 * ARENA_ROUNDS_PER_SLOT)
    assert describe_queue(demo.queue_settings) == (
        f"queue: 3 generation slot(s) (Arena rounds batched: {3 * ARENA_ROUNDS_PER_SLOT} admitted at once), at "
        "most 7 requests waiting; Gradio's cache cleaned every 60 s (files older than 120 s)")
    monkeypatch.setenv("DMD2_DELETE_CACHE", "off")
    assert build_app(tiny_models, votes_path=tmp_path / "v.sqlite").delete_cache is None
    for name, value, message in (("DMD2_QUEUE_SIZE", "lots", r"\$DMD2_QUEUE_SIZE must be a whole number"),
                                 ("DMD2_CONCURRENCY", "0", r"\$DMD2_CONCURRENCY must be a whole number >= 1"),
                                 ("DMD2_DELETE_CACHE", "hourly", r"\$DMD2_DELETE_CACHE must be FREQUENCY,AGE")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=message):
            build_app(tiny_models, votes_path=tmp_path / "v.sqlite")
        monkeypatch.delenv(name)


def test_a_full_queue_says_the_app_is_busy(tmp_path):
    """One slot, one waiting place: the third request is refused with BUSY_MESSAGE (HTTP 503)."""
    import gradio as gr
    import httpx
    from gradio_client import Client

    from dmd2.ui.app import BUSY_MESSAGE, configure_queue

    started, release = threading.Event(), threading.Event()

    def slow(x):
        started.set()
        release.wait(HANG_GUARD_S)
        return x

    with gr.Blocks() as demo:
        box = gr.Textbox()
        gr.Button().click(slow, box, box, api_name="new_round")       # a generation event
    configure_queue(demo, concurrency=1, queue_size=1)
    try:
        with served(demo) as url:
            client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
            running = client.submit("first", api_name="/new_round")
            assert started.wait(HANG_GUARD_S)
            waiting = client.submit("second", api_name="/new_round")
            deadline = time.monotonic() + HANG_GUARD_S
            while len(demo._queue) < 1 and time.monotonic() < deadline:      # the second is in the queue
                time.sleep(0.05)
            fn_index = next(i for i, fn in demo.fns.items() if fn.api_name == "new_round")
            r = httpx.post(f"{url}gradio_api/queue/join", json=dict(
                data=["third"], fn_index=fn_index, session_hash="a-third-user", event_data=None, trigger_id=None))
            assert r.status_code == 503
            assert r.json()["detail"] == BUSY_MESSAGE.format(size=1)
            assert "busy" in r.json()["detail"] and "Try again in a moment" in r.json()["detail"]
            release.set()
            assert running.result(timeout=HANG_GUARD_S) == "first" and waiting.result(timeout=HANG_GUARD_S) == "second"
    finally:
        release.set()


def test_gradio_cache_is_cleaned(tiny_models, tmp_path):
    """Every served image used to stay in Gradio's cache for the life of the server."""
    from gradio_client import Client

    from dmd2.ui.app import build_app

    demo = build_app(tiny_models, votes_path=tmp_path / "v.sqlite", delete_cache=(1, 1))
    with served(demo) as url:
        out = Client(url, verbose=False, download_files=False).predict(6, 123457, 1, 2, 1.0,      # an image
                                                                       api_name="/compare")  # no other test draws
        served_file = Path(out[0]["path"] if isinstance(out[0], dict) else out[0].path)
        assert out[1].startswith("tiny-teacher: NFE 2")
        deadline = time.monotonic() + HANG_GUARD_S
        while served_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not served_file.exists()
