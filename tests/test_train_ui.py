"""Train tab: the pure helpers, and real trainers launched, stopped and resumed through the app with gradio_client."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest

from conftest import served, tiny_pixel_unet
from dmd2 import registry
from dmd2.arena import VoteStore
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.arena import Arena
from dmd2.ui.train import (NotAllowed, TrainError, TrainManager, eta_seconds, format_duration, list_presets,
                           loss_frame, overrides_from)

TOKEN = "correct horse battery staple"
WAIT_S = 900            # a hang guard for polling loops, not a timing assertion
FINAL = ("finished", "failed", "stopped")


# --- pure helpers ------------------------------------------------------------------------

def test_overrides_are_written_so_the_trainer_reads_them_back():
    settings = dict(iterations=4.0, batch_size=8, generator_lr=2e-4, critic_lr=1e-05, backward_simulation=False,
                    gan_critic_weight=None, teacher="/tmp/a b/teacher")
    assert overrides_from(settings, "# a comment\n\n sample_every=2 \neval_every=0") == [
        "iterations=4", "batch_size=8", "generator_lr=0.0002", "critic_lr=1e-05", "backward_simulation=false",
        'teacher="/tmp/a b/teacher"', "sample_every=2", "eval_every=0"]
    from training.config import load_config

    cfg = load_config(None, overrides_from(settings))
    assert (cfg.iterations, cfg.batch_size, cfg.generator_lr, cfg.critic_lr, cfg.backward_simulation, cfg.teacher) == \
        (4, 8, 2e-4, 1e-5, False, "/tmp/a b/teacher")
    with pytest.raises(TrainError, match="'steps 4' must look like key=value"):
        overrides_from({}, "steps 4")


def test_eta_uses_the_pace_since_the_last_restart():
    def rec(step, seconds):
        return {"step": step, "seconds": seconds, "images_per_s": 1.0}
    assert eta_seconds([], 0, 10) is None
    assert eta_seconds([rec(2, 4.0)], 2, 10) == pytest.approx(16.0)           # one record from step 0
    assert eta_seconds([rec(2, 4.0), rec(4, 6.0)], 4, 10) == pytest.approx(6.0)
    evaluation = {"step": 4, "seconds": 60.0, "eval/fid": 9.0}                 # not a pace sample
    resumed = [rec(2, 4.0), rec(4, 6.0), evaluation, rec(5, 3.0), rec(7, 13.0)]
    assert eta_seconds(resumed, 7, 10) == pytest.approx(15.0)                  # 5 s/step since the resume
    assert eta_seconds(resumed[:4], 5, 10) is None                             # one record after a resume
    assert eta_seconds([rec(10, 20.0)], 10, 10) == 0.0
    assert [format_duration(s) for s in (0.4, 45, 125, 3725)] == ["0 s", "45 s", "2 min 05 s", "1 h 02 min"]


def test_loss_frame_keeps_losses_only():
    records = [{"step": 1, "seconds": 1.0, "images_per_s": 3.0, "critic/fake_denoise": 0.5, "critic/lr": 1e-4,
                "critic/grad_norm": 2.0, "generator/dm": 0.1}, {"step": 1, "seconds": 2.0, "eval/fid": 30.0}]
    frame = loss_frame(records)
    assert sorted(frame["loss"]) == ["critic/fake_denoise", "generator/dm"]
    assert list(frame.columns) == ["step", "value", "loss"]


def test_gpu_presets_are_listed_only_with_cuda(tmp_path):
    (tmp_path / "mnist-1step.yaml").write_text("student_steps: 1\n")
    (tmp_path / "sdxl-4step.yaml").write_text("family: sdxl\n")
    (tmp_path / "sd15-lora.yaml").write_text("family: sd15\n")
    assert list_presets(tmp_path, cuda=False) == ["mnist-1step"]
    assert list_presets(tmp_path, cuda=True) == ["mnist-1step", "sd15-lora", "sdxl-4step"]
    assert "mnist-1step" in list_presets() and "mnist-4step" in list_presets()     # the shipped presets


def test_admin_token_and_public_apps(tmp_path):
    open_app = TrainManager(tmp_path)
    open_app.authorize(None)                                                   # local, no token: allowed
    guarded = TrainManager(tmp_path, admin_token=TOKEN)
    with pytest.raises(NotAllowed, match="needs the admin token"):
        guarded.authorize("")
    with pytest.raises(NotAllowed, match="Wrong admin token"):
        guarded.authorize(TOKEN + "x")
    guarded.authorize(TOKEN)
    public = TrainManager(tmp_path, public=True)
    assert "Training is disabled: this app is public" in public.refusal()
    with pytest.raises(NotAllowed, match="DMD2_ADMIN_TOKEN"):
        public.authorize("anything")
    TrainManager(tmp_path, public=True, admin_token=TOKEN).authorize(TOKEN)
    assert TrainManager(tmp_path, admin_token="").token_required is False       # empty = not configured


def test_wrong_tokens_lock_the_admin_actions_for_a_while(tmp_path):
    from dmd2.ui.train import LOCKOUT_S, MAX_WRONG_TOKENS

    now = [1000.0]
    guarded = TrainManager(tmp_path, admin_token=TOKEN, clock=lambda: now[0])
    for _ in range(MAX_WRONG_TOKENS):
        with pytest.raises(NotAllowed, match="Wrong admin token"):
            guarded.authorize("guess")
    with pytest.raises(NotAllowed, match="Too many wrong admin tokens.*try again in 60 s"):
        guarded.authorize(TOKEN)                                   # even the right one, during the lockout
    now[0] += LOCKOUT_S / 2
    with pytest.raises(NotAllowed, match="try again in 30 s"):
        guarded.authorize(TOKEN)
    now[0] += LOCKOUT_S / 2
    guarded.authorize(TOKEN)                                       # the window has passed
    with pytest.raises(NotAllowed, match="Wrong admin token"):     # and a new window starts from zero
        guarded.authorize("guess")


@pytest.mark.parametrize("share, host, space, public", [
    (False, None, None, False), (False, "127.0.0.1", None, False), (False, "localhost", None, False),
    (False, "::1", None, False), (False, "[::1]", None, False), (False, "0.0.0.0", None, True),
    (False, "192.168.1.5", None, True), (False, "::", None, True), (True, "127.0.0.1", None, True),
    (False, "127.0.0.1", "user/space", True),
])
def test_is_public_counts_network_hosts_shares_and_spaces(monkeypatch, share, host, space, public):
    from dmd2.ui.train import is_public

    monkeypatch.delenv("SPACE_ID", raising=False)
    if space:
        monkeypatch.setenv("SPACE_ID", space)
    assert is_public(share, host) is public


@pytest.mark.parametrize("name, message", [
    ("../evil", "bad run name"), ("a/b", "bad run name"), ("", "enter a run name"), ("..", "bad run name"),
    ("x" * 65, "bad run name"),
])
def test_run_names_cannot_leave_the_runs_folder(tmp_path, name, message):
    with pytest.raises(TrainError, match=message):
        TrainManager(tmp_path / "runs").run_dir(name)


def test_bad_knob_values_fail_with_the_trainers_message(tmp_path):
    m = TrainManager(tmp_path)
    with pytest.raises(TrainError, match=r"bad setting: config batch_size=0: must be an integer >= 1"):
        m.check("mnist-1step", {"batch_size": 0})
    with pytest.raises(TrainError, match=r"config iterations=2.5: must be an integer"):
        m.check("mnist-1step", {"iterations": 2.5})
    with pytest.raises(TrainError, match="unknown config key 'stepz'"):
        m.check("mnist-1step", {}, "stepz=3")
    with pytest.raises(TrainError, match="teacher folder '/nowhere' has no config.json"):
        m.check("mnist-1step", {"teacher": "/nowhere"})
    with pytest.raises(TrainError, match="unknown preset 'sdxl-nope'"):
        m.check("sdxl-nope")
    cfg, overrides = m.check("mnist-4step", {"iterations": 3})
    assert cfg.iterations == 3 and cfg.student_steps == 4 and overrides == ["iterations=3"]


def write_run(root, name, state, student=True):
    run = root / name
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": state}))
    if student:
        save_pixel_unet(tiny_pixel_unet(), run / "student", timesteps=[999])
    return run


def test_run_students_lists_finished_runs_only(tmp_path):
    assert registry.run_students(tmp_path / "missing") == []
    write_run(tmp_path, "b-done", "finished")
    write_run(tmp_path, "a-done", "finished")
    write_run(tmp_path, "running", "running")
    write_run(tmp_path, "no-student", "finished", student=False)
    (tmp_path / "not-a-run").mkdir()
    assert registry.run_students(tmp_path) == [str(tmp_path / n / "student") for n in ("a-done", "b-done")]


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


def test_dmd2_reaches_training_only_through_training_runs():
    """DESIGN.md: `training` imports `dmd2`, never the reverse, except the UI through `training.runs`."""
    import re

    root = Path(__file__).resolve().parent.parent / "dmd2"
    found = [(str(p.relative_to(root.parent)), line.strip()) for p in sorted(root.rglob("*.py"))
             for line in p.read_text().splitlines() if re.match(r"\s*(from|import)\s+training\b", line)]
    assert found, "the Train tab should import training.runs"
    bad = [(f, line) for f, line in found if not (f.startswith("dmd2/ui/") and line.startswith("from training.runs import"))]
    assert bad == []
