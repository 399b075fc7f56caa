"""Train tab: the pure helpers, and real trainers launched, stopped and resumed through the app with gradio_client."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest

from conftest import served, tiny_pixel_unet, write_run
from dmd2.arena import VoteStore
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.arena import Arena
from dmd2.ui.train import TrainManager, format_duration, loss_frame

TOKEN = "correct horse battery staple"
WAIT_S = 900            # a hang guard for polling loops, not a timing assertion
FINAL = ("finished", "failed", "stopped")


# --- pure helpers ------------------------------------------------------------------------

def test_durations_read_as_a_person_would():
    assert [format_duration(s) for s in (0.4, 45, 125, 3725)] == ["0 s", "45 s", "2 min 05 s", "1 h 02 min"]


def test_loss_frame_keeps_losses_only():
    records = [{"step": 1, "seconds": 1.0, "images_per_s": 3.0, "critic/fake_denoise": 0.5, "critic/lr": 1e-4,
                "critic/grad_norm": 2.0, "generator/dm": 0.1}, {"step": 1, "seconds": 2.0, "eval/fid": 30.0}]
    frame = loss_frame(records)
    assert sorted(frame["loss"]) == ["critic/fake_denoise", "generator/dm"]
    assert list(frame.columns) == ["step", "value", "loss"]


def test_arena_reads_its_model_list_per_round(tmp_path):
    models = [str(write_run(tmp_path, "one", "finished") / "student")]
    with VoteStore(tmp_path / "votes.sqlite") as store:
        arena = Arena(lambda: list(models), store, rng=np.random.default_rng(0))
        with pytest.raises(ValueError, match="at least two models, got 1"):
            arena.new_round()
        models.append(str(write_run(tmp_path, "two", "finished") / "student"))
        verdict = arena.vote(arena.new_round("1").token, "a", "c")
        assert {verdict.model_a, verdict.model_b} == {"one", "two"}            # a run's student: its run name


# --- the real app, real trainers -----------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random 10-class 32x32 teacher: trainer steps take a fraction of a second."""
    path = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    save_pixel_unet(tiny_pixel_unet(), path)
    return path


def tiny(teacher, **settings) -> tuple[dict, str]:
    """(settings, extra lines) for a run of a few steps on the tiny teacher."""
    extra = f"teacher={teacher}\neval_every=0\nlog_every=1\nsample_every=2\ncheckpoint_every=2\nwarmup_steps=0"
    return dict(dict(iterations=4, batch_size=4), **settings), extra


@pytest.fixture(scope="module")
def app(teacher, tmp_path_factory):
    """The app with the tiny teacher as its only fixed model, a fresh runs folder and an admin token."""
    from gradio_client import Client

    from dmd2.ui.app import build_app

    runs = tmp_path_factory.mktemp("runs")
    manager = TrainManager(runs, admin_token=TOKEN)
    demo = build_app([str(teacher)], votes_path=tmp_path_factory.mktemp("votes") / "votes.sqlite",
                     trainer=manager)
    try:
        with served(demo) as url:
            yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads"))), manager
    finally:
        manager.close()


def wait_for(client, name, done, what):
    """Poll /train_status until done(view); fails (with the last view) only if it never happens."""
    deadline = time.monotonic() + WAIT_S
    while True:
        v = client.predict(name, api_name="/train_status")
        if done(v):
            return v
        assert v["state"] not in FINAL or what in FINAL, f"run {name} ended as {v} while waiting for {what}"
        assert time.monotonic() < deadline, f"run {name} never reached {what}: {v}"
        time.sleep(0.5)


def group_gone(pid) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def launch(client, name, settings, extra, token=TOKEN):
    return client.predict("mnist-1step", name, settings, extra, token, api_name="/train_launch")


def test_launch_runs_to_the_end_and_the_student_joins_compare_and_arena(app, teacher):
    from gradio_client.exceptions import AppError

    client, manager = app
    with pytest.raises(AppError, match="at least two models, got 1"):
        client.predict("1", api_name="/new_round")
    assert "done" not in client.predict(api_name="/compare_more_models")

    v = launch(client, "done", *tiny(teacher))
    assert v["name"] == "done" and v["state"] in ("starting", "running", "finished") and v["total"] == 4
    v = wait_for(client, "done", lambda v: v["state"] in FINAL, "the end")
    assert v["state"] == "finished" and v["step"] == v["total"] == 4 and v["percent"] == 100.0, v
    assert v["student"] and v["records"] == 4 and v["error"] is None
    assert ["done", "finished", 4, 4] in [row[:4] for row in client.predict(api_name="/train_runs")]
    run = manager.runs_root / "done"
    assert (run / "samples" / "latest.png").is_file() and (run / "student" / "dmd2.json").is_file()

    assert "done" in client.predict(api_name="/compare_more_models")            # no restart needed
    [item] = client.predict(["done"], 1, 0, 2, 2, 1.0, api_name="/compare_more")
    assert item["caption"].startswith("done: NFE 1, steps 1, ")
    token, *_ = client.predict("1", api_name="/new_round")                      # two models now
    assert "done" in {*client.predict(token, "tie", api_name="/vote").values()}
    table = client.predict(api_name="/leaderboard")[0]
    assert "done" in [row[1] for row in table["data"]]

    with pytest.raises(AppError, match="run 'done' already exists"):
        launch(client, "done", *tiny(teacher))
    with pytest.raises(AppError, match="unknown model 'nope'"):
        client.predict(["nope"], 1, 0, 2, 2, 1.0, api_name="/compare_more")


def test_stop_ends_the_process_group_and_resume_continues_from_the_checkpoint(app, teacher):
    from gradio_client.exceptions import AppError

    client, manager = app
    run = manager.runs_root / "long"
    launch(client, "long", *tiny(teacher, iterations=100_000))
    v = wait_for(client, "long", lambda v: v["state"] == "running" and v["step"] >= 3, "step 3")
    assert list((run / "checkpoints").glob("step-*/state.pt"))                   # something to resume from
    assert v["eta_s"] is not None and v["eta_s"] > 0 and v["percent"] == round(100 * v["step"] / 100_000, 1)
    pid = v["pid"]
    assert os.getpgid(pid) == pid                                               # its own process group
    with pytest.raises(AppError, match="run 'long' is still running"):          # one trainer at a time
        launch(client, "second", *tiny(teacher))
    with pytest.raises(AppError, match="Wrong admin token"):
        client.predict("long", "guess", api_name="/train_stop")

    client.predict("long", TOKEN, api_name="/train_stop")
    v = wait_for(client, "long", lambda v: v["state"] in FINAL, "stopped")
    assert v["state"] == "stopped" and 3 <= v["step"] < 100_000, v
    deadline = time.monotonic() + WAIT_S
    while not group_gone(pid):
        assert time.monotonic() < deadline, f"process group {pid} still exists after stop"
        time.sleep(0.2)
    with pytest.raises(AppError, match="run 'long' is not running"):
        client.predict("long", TOKEN, api_name="/train_stop")
    stopped_at = v["step"]

    client.predict("long", TOKEN, api_name="/train_resume")
    v = wait_for(client, "long", lambda v: v["state"] == "running" and v["step"] > stopped_at, "past the stop")
    assert v["pid"] != pid
    client.predict("long", TOKEN, api_name="/train_stop")
    assert wait_for(client, "long", lambda v: v["state"] in FINAL, "stopped")["state"] == "stopped"

    log = (run / "train.log").read_text()
    assert log.count("$ ") == 2 and "--resume" in log.split("$ ")[2]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[0] == 1                         # resumed, not restarted
    assert steps[-1] > stopped_at                                                # ... and went on past the stop


def test_launch_needs_the_token_and_a_good_name_and_values(app, teacher):
    from gradio_client.exceptions import AppError

    client, manager = app
    settings, extra = tiny(teacher)
    with pytest.raises(AppError, match="needs the admin token"):
        launch(client, "t1", settings, extra, token="")
    with pytest.raises(AppError, match="Wrong admin token"):
        launch(client, "t1", settings, extra, token="nope")
    for name in ("../escape", "a/b", "/abs"):
        with pytest.raises(AppError, match="bad run name"):
            launch(client, name, settings, extra)
    with pytest.raises(AppError, match="config batch_size=0: must be an integer >= 1"):
        launch(client, "t1", dict(settings, batch_size=0), extra)
    with pytest.raises(AppError, match="needs the admin token"):
        client.predict("done", "", api_name="/train_resume")
    assert not (manager.runs_root / "t1").exists() and not (manager.runs_root.parent / "escape").exists()


def test_a_failing_trainer_is_reported_with_its_error(app, teacher, tmp_path):
    client, manager = app
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    (broken / "config.json").write_text((teacher / "config.json").read_text())   # weights missing
    settings, extra = tiny(teacher)
    launch(client, "broken", settings, extra.replace(str(teacher), str(broken)))
    v = wait_for(client, "broken", lambda v: v["state"] in FINAL, "failed")
    assert v["state"] == "failed" and "exited with code 1" in v["error"] and "error:" in v["error"], v


def test_one_clients_wrong_tokens_do_not_lock_the_admin_out(app, teacher, tmp_path, monkeypatch):
    """Through /train_launch: a guesser's address is locked after MAX_WRONG_TOKENS, the admin's is not."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from dmd2.ui.auth import MAX_WRONG_TOKENS

    client, manager = app
    monkeypatch.setenv("SPACE_ID", "user/space")           # clients told apart by x-forwarded-for's first entry

    def from_address(address):
        return Client(client.src, verbose=False, download_files=str(tmp_path),
                      headers={"x-forwarded-for": f"{address}, 10.0.0.1"})

    guesser, admin = from_address("203.0.113.66"), from_address("198.51.100.20")
    settings, extra = tiny(teacher)
    for k in range(MAX_WRONG_TOKENS):
        guesser.reset_session()                             # fresh sessions do not help the guesser
        with pytest.raises(AppError, match="Wrong admin token"):
            launch(guesser, "t-lock", settings, extra, token=f"guess-{k}")
    with pytest.raises(AppError, match="Too many wrong admin tokens"):
        launch(guesser, "t-lock", settings, extra)
    with pytest.raises(AppError, match="bad run name"):    # the admin passes the gate (the name then fails)
        launch(admin, "../t-lock", settings, extra)
    with pytest.raises(AppError, match="Too many wrong admin tokens"):   # stop and resume: the same lockout
        guesser.predict("done", TOKEN, api_name="/train_stop")
    with pytest.raises(AppError, match="Too many wrong admin tokens"):
        guesser.predict("done", TOKEN, api_name="/train_resume")
    assert not (manager.runs_root / "t-lock").exists()


def test_public_app_without_token_refuses_to_train(teacher, tmp_path, monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from dmd2.ui.app import build_app

    monkeypatch.delenv("DMD2_ADMIN_TOKEN", raising=False)
    demo = build_app([str(teacher)], votes_path=tmp_path / "v.sqlite", runs_root=tmp_path / "runs", public=True)
    with served(demo) as url:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match="Training is disabled: this app is public"):
            launch(client, "x", *tiny(teacher), token="")
        assert not (tmp_path / "runs" / "x").exists()
