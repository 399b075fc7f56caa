"""Issue 15's round trip through the app itself: `app.py` with $DMD2_VOTES_REPO syncs its votes to the Hub
(a local stand-in) when a Space stops it with SIGTERM; the votes file is deleted (a Space's wiped disk); a new
`app.py` restores the same votes on start."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

from conftest import free_port, tiny_pixel_unet
from dmd2.families.pixel import save_pixel_unet
from test_vote_sync import REPO, TOKEN, hub, hub_votes  # noqa: F401  (hub: a fixture)

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD_S = 300              # deadlines for the app to come up or stop, not timing assertions


def start_app(tmp_path, hub_url: str, port: int, models: list[str]) -> subprocess.Popen:
    env = dict(os.environ, HF_ENDPOINT=hub_url, HF_TOKEN=TOKEN, DMD2_VOTES_REPO=REPO,
               DMD2_VOTES=str(tmp_path / "data" / "votes.sqlite"), DMD2_ARENA_SALT="fixed-salt-for-the-test",
               DMD2_VOTES_PER_MINUTE="0", DMD2_RUNS=str(tmp_path / "runs"), GRADIO_ANALYTICS_ENABLED="False")
    env.pop("HF_HUB_OFFLINE", None)
    args = [sys.executable, str(ROOT / "app.py"), "--port", str(port)] + [a for m in models for a in ("--model", m)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def client_of(app: subprocess.Popen, port: int, tmp_path):
    from gradio_client import Client

    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        try:
            return Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "dl"))
        except Exception:
            assert app.poll() is None, app.stdout.read().decode()
            assert time.monotonic() < deadline, "app.py did not come up"
            time.sleep(1)


def rows(db: Path) -> list[tuple]:
    if not db.is_file():
        return []
    with sqlite3.connect(db) as conn:
        return sorted(conn.execute("SELECT battle_id, model_a, model_b, outcome, client_hash FROM votes"))


def test_app_syncs_on_sigterm_and_a_new_app_restores_the_votes(hub, tmp_path):  # noqa: F811
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, tmp_path / "tiny-teacher")
    save_pixel_unet(unet, tmp_path / "tiny-student", timesteps=[999])
    models = [str(tmp_path / "tiny-teacher"), str(tmp_path / "tiny-student")]
    db = tmp_path / "data" / "votes.sqlite"

    port = free_port()
    app = start_app(tmp_path, hub.url, port, models)
    try:
        client = client_of(app, port, tmp_path)
        for outcome in ("a", "b", "tie"):
            token, *_ = client.predict("1", api_name="/new_round")
            client.predict(token, outcome, api_name="/vote")
        before = rows(db)
        assert len(before) == 3
    finally:
        os.killpg(app.pid, signal.SIGTERM)                       # how a Space stops the app
        app.wait(HANG_GUARD_S)
    assert sorted(v["battle_id"] for v in hub_votes(hub)) == [r[0] for r in before]   # synced on the way out

    for f in db.parent.glob("votes.sqlite*"):                     # the Space's disk is wiped (salt kept: a secret)
        f.unlink()
    port = free_port()
    app = start_app(tmp_path, hub.url, port, models)
    try:
        client_of(app, port, tmp_path)
        deadline = time.monotonic() + HANG_GUARD_S
        while rows(db) != before:                                 # the restore runs in the background
            assert time.monotonic() < deadline, f"votes not restored: {rows(db)} vs {before}"
            time.sleep(0.5)
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        app.wait(HANG_GUARD_S)
