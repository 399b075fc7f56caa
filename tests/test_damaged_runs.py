"""Issue 16, finding 1 and 3: damaged run folders and corrupt students never break the app. Every kind of
damage found by hand (a status.json that is a list, a string, not UTF-8, a folder, with a string `updated` or
`step`; a metrics line that is not an object; a finished run whose student does not load) sits beside one
good run while the app serves: Compare, Arena, Leaderboard and Train keep answering."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import pytest

from conftest import served, tiny_pixel_unet, write_broken_model, write_run
from dmd2 import registry
from dmd2.families.pixel import save_pixel_unet
from test_runs import DAMAGES, damage_status
from training.runs import Run

TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder: one good finished run, one run per kind of damage, a corrupt student, odd metrics."""
    root = tmp_path_factory.mktemp("runs")
    write_run(root, "good", "finished")
    for i, damage in enumerate(DAMAGES):
        damage_status(Run(write_run(root, f"damaged-{i}", "finished")), damage)
    corrupt = write_run(root, "corrupt", "finished", student=False)
    write_broken_model(corrupt / "student", root / "good" / "student")
    odd = Run(write_run(root, "odd-metrics", "finished"))
    odd.metrics_path.write_text('[1, 2]\n"text"\n{"step": 3, "seconds": 1.0, "images_per_s": 2.0}\n')
    return root


@pytest.fixture(scope="module")
def app(runs, tmp_path_factory):
    from gradio_client import Client

    from dmd2.ui.app import build_app
    from dmd2.ui.train import TrainManager

    teacher = tmp_path_factory.mktemp("teacher") / "tiny-teacher"
    save_pixel_unet(tiny_pixel_unet(), teacher)
    manager = TrainManager(runs, admin_token=TOKEN)
    demo = build_app([str(teacher)], votes_path=tmp_path_factory.mktemp("votes") / "votes.sqlite", trainer=manager)
    with served(demo) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    manager.close()


def test_only_sound_students_join_compare_and_the_arena(app, runs):
    assert sorted(app.predict(api_name="/compare_more_models")) == ["good", "odd-metrics"]
    assert registry.load_failure(str(runs / "corrupt" / "student"))       # tried once, remembered
    for _ in range(6):                                                     # 3 models; the corrupt one never drawn
        token, *_ = app.predict("1", api_name="/new_round")
        assert token, "a round could not be voted on"
        names = {v for v in app.predict(token, "tie", api_name="/vote").values() if isinstance(v, str)}
        assert "corrupt" not in names and not any(n.startswith("damaged") for n in names)
    table = app.predict(api_name="/leaderboard")[0]
    assert "corrupt" not in [row[1] for row in table["data"]]


def test_the_train_tab_lists_damaged_runs_with_their_reason(app):
    rows = {row[0]: row for row in app.predict(api_name="/train_runs")}
    assert {f"damaged-{i}" for i in range(len(DAMAGES))} <= set(rows)
    assert all(rows[f"damaged-{i}"][1] == "damaged" for i in range(len(DAMAGES)))
    for i, reason in enumerate(DAMAGES.values()):
        v = app.predict(f"damaged-{i}", api_name="/train_status")
        assert v["state"] == "damaged" and reason in v["error"], v
    v = app.predict("odd-metrics", api_name="/train_status")
    assert v["state"] == "finished" and v["records"] == 1


def test_damage_appearing_while_the_app_runs_is_reported_not_raised(app, runs):
    good = Run(runs / "good")
    before = good.status_path.read_text()
    try:
        good.status_path.write_text('{"state": "running", "updated": "later"}')
        v = app.predict("good", api_name="/train_status")
        assert v["state"] == "damaged" and "'updated' is 'later'" in v["error"]
        assert "good" in {row[0] for row in app.predict(api_name="/train_runs")}
    finally:
        good.status_path.write_text(before)
    assert app.predict("good", api_name="/train_status")["state"] == "finished"


def test_the_train_tab_says_when_a_finished_student_is_not_served(app, runs):
    from dmd2.ui.train import status_markdown

    v = app.predict("corrupt", api_name="/train_status")
    assert v["state"] == "finished" and v["served"] is False and v["student_error"]
    text = status_markdown(v)
    assert "**finished**, but its student is not served: could not load" in text and str(runs) not in text   # no paths
    good = app.predict("good", api_name="/train_status")
    assert good["served"] is True and "now in Compare" in status_markdown(good)
    damaged = app.predict("damaged-0", api_name="/train_status")
    assert "**damaged**: its run folder cannot be read" in status_markdown(damaged)
