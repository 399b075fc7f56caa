"""Compare with a guidance-conditioned student (issue 19): one w slider for guided students only, limited to
their range, its w in their captions, a bad w refused in one line naming the range, and old API clients."""

from __future__ import annotations

import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
from PIL import Image

from conftest import served, tiny_pixel_unet
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.compare import compare
from dmd2.ui.widgets import GUIDED_W_LABEL, check_guided_w, format_w, guided_students, guided_w_control
from guided_student import make_tiny_guided_student


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher, a plain 1-step student and a guided 1-step student (w in [1, 3], default 1)."""
    root = tmp_path_factory.mktemp("guided-models")
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, root / "tiny-teacher")
    save_pixel_unet(unet, root / "tiny-plain", timesteps=[999])
    make_tiny_guided_student(root / "tiny-guided")
    return dict(teacher=str(root / "tiny-teacher"), plain=str(root / "tiny-plain"),
                guided=str(root / "tiny-guided"), root=root)


def by_name(results, names):
    return dict(zip(names, results))


def test_w_goes_to_the_guided_student_only_and_shows_in_its_caption(models):
    names = ["teacher", "plain", "guided"]
    paths = [models[n] for n in names]
    default = by_name(compare(paths, label=3, seed=5, num_images=4, steps=2, guidance=2.0), names)
    at_1 = by_name(compare(paths, label=3, seed=5, num_images=4, steps=2, guidance=2.0, guided_w=1.0), names)
    at_3 = by_name(compare(paths, label=3, seed=5, num_images=4, steps=2, guidance=2.0, guided_w=3.0), names)
    assert default["guided"][1].startswith("tiny-guided: NFE 1, steps 1, w=1.0, ")     # its guidance_default
    assert at_3["guided"][1].startswith("tiny-guided: NFE 1, steps 1, w=3.0, ")
    assert np.array_equal(default["guided"][0], at_1["guided"][0])
    assert not np.array_equal(at_1["guided"][0], at_3["guided"][0])                      # w reaches the network
    for name in ("teacher", "plain"):                                                     # and nothing else
        assert np.array_equal(at_1[name][0], at_3[name][0])
        assert "w=" not in at_3[name][1]
    assert at_3["teacher"][1].startswith("tiny-teacher: NFE 4, steps 2, ")                # CFG 2 stays the teacher's
    # Without a guided student the value is not used at all.
    [(img, cap)] = compare([models["plain"]], 3, 5, 4, guided_w=99)
    assert cap.startswith("tiny-plain: NFE 1, steps 1, ") and img is not None


@pytest.mark.parametrize("w, message", [
    (3.5, "Guided student's guidance w must be between 1 and 3 (tiny-guided's range), got 3.5"),
    (0.5, "must be between 1 and 3 (tiny-guided's range), got 0.5"),
    (float("nan"), "must be between 1 and 3"),
    ("strong", "must be a number between 1 and 3 (tiny-guided's range), got 'strong'"),
])
def test_a_w_outside_the_range_is_one_line_naming_it(models, w, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        compare([models["plain"], models["guided"]], 3, 5, 1, guided_w=w)
    assert "\n" not in str(e.value) and str(models["root"]) not in str(e.value)


def test_several_guided_students_share_one_w_inside_every_range(models, tmp_path):
    wide = make_tiny_guided_student(tmp_path / "wide", seed=1, guidance_range=[2.0, 5.0], guidance_default=2.0)
    far = make_tiny_guided_student(tmp_path / "far", seed=2, guidance_range=[4.0, 6.0], guidance_default=4.0)
    students = guided_students([models["teacher"], models["plain"], models["guided"], wide])
    assert students == [("tiny-guided", (1.0, 3.0), 1.0), ("wide", (2.0, 5.0), 2.0)]
    assert check_guided_w("2.5", students) == 2.5
    with pytest.raises(ValueError, match=r"between 2 and 3 \(the range tiny-guided \[1, 3\]; wide \[2, 5\] share\)"):
        check_guided_w(1.5, students)
    control = guided_w_control(students)
    assert (control["visible"], control["minimum"], control["maximum"], control["value"]) == (True, 2.0, 3.0, 2.0)
    results = compare([models["guided"], wide], 3, 5, 1, guided_w=2.5)
    assert [cap.split(", ")[2] for _, cap in results] == ["w=2.5", "w=2.5"]
    # Ranges that share no w: any request with both is refused, naming both ranges.
    with pytest.raises(ValueError, match=r"ranges do not overlap \(tiny-guided \[1, 3\]; far \[4, 6\]\)"):
        compare([models["guided"], far], 3, 5, 1, guided_w=2.0)
    assert guided_w_control([])["visible"] is False


def test_format_w():
    assert [format_w(w) for w in (2, 2.0, 2.25, 1.5)] == ["w=2.0", "w=2.0", "w=2.25", "w=1.5"]


# --- the real app on localhost ---------------------------------------------------------


def slider(demo, elem_id="compare-guided-w"):
    import gradio as gr

    [s] = [b for b in demo.blocks.values() if isinstance(b, gr.Slider) and b.elem_id == elem_id]
    return s


@pytest.fixture(scope="module")
def app(models, tmp_path_factory):
    from gradio_client import Client

    from dmd2.ui.app import build_app

    demo = build_app([models["teacher"], models["plain"], models["guided"]],
                     votes_path=tmp_path_factory.mktemp("votes") / "votes.sqlite")
    with served(demo) as url:
        yield demo, Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_the_app_has_a_w_slider_limited_to_the_guided_students_range(app):
    demo, _ = app
    s = slider(demo)
    assert (s.label, s.minimum, s.maximum, s.value, s.visible) == (GUIDED_W_LABEL, 1.0, 3.0, 1.0, True)
    import gradio as gr

    labels = [b.label for b in demo.blocks.values() if isinstance(b, gr.Slider)]
    assert "Teacher guidance (CFG)" in labels and labels.count(GUIDED_W_LABEL) == 1     # the teacher keeps its own


def test_the_app_samples_the_guided_student_at_w_and_old_clients_still_work(app):
    from gradio_client.exceptions import AppError

    _, client = app
    old = client.predict(3, 5, 4, 2, 2.0, api_name="/compare")       # a client that sends no w: the slider's value
    at_3 = client.predict(3, 5, 4, 2, 2.0, 3.0, api_name="/compare")
    assert len(old) == len(at_3) == 6
    t_old, t_cap, p_old, p_cap, g_old, g_cap = old
    t_3, _, p_3, _, g_3, g_cap_3 = at_3
    assert g_cap.startswith("tiny-guided: NFE 1, steps 1, w=1.0, ")
    assert g_cap_3.startswith("tiny-guided: NFE 1, steps 1, w=3.0, ")
    assert t_cap.startswith("tiny-teacher: NFE 4, steps 2, ") and "w=" not in p_cap
    assert not np.array_equal(pixels(g_old), pixels(g_3))
    assert np.array_equal(pixels(t_old), pixels(t_3)) and np.array_equal(pixels(p_old), pixels(p_3))
    none = client.predict(3, 5, 4, 2, 2.0, None, api_name="/compare")                  # null: its own default
    assert none[5].startswith("tiny-guided: NFE 1, steps 1, w=1.0, ")
    refusal = r"^Guided student's guidance w must be between 1 and 3 \(tiny-guided's range\), got 5$"
    with pytest.raises(AppError, match=refusal):
        client.predict(3, 5, 1, 2, 2.0, 5, api_name="/compare")
    at_2 = client.predict(3, 5, 1, 2, 2.0, 2.0, api_name="/compare")
    assert at_2[5].startswith("tiny-guided: NFE 1, steps 1, w=2.0")


def test_an_app_without_a_guided_student_hides_the_slider_and_ignores_w(models, tmp_path):
    from dmd2.ui.app import build_app

    demo = build_app([models["teacher"], models["plain"]], votes_path=tmp_path / "votes.sqlite",
                     runs_root=tmp_path / "runs")
    assert slider(demo).visible is False


def test_a_guided_finished_run_brings_the_slider_and_takes_w(models, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from dmd2.ui.app import build_app

    before = build_app([models["teacher"], models["plain"]], votes_path=tmp_path / "votes.sqlite",
                       runs_root=tmp_path / "runs")
    assert slider(before).visible is False
    run = tmp_path / "runs" / "guided-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished"}))
    make_tiny_guided_student(run / "student", seed=3, guidance_range=[1.5, 2.5], guidance_default=2.0)
    # The run finished while the app ran: Refresh list (or opening the tab) brings the slider, at its range.
    [refresh] = [f.fn for f in before.fns.values() if f.name == "choices"]
    dropdown, update, _ = refresh(None)
    assert dropdown.choices == [("guided-run", "guided-run")]
    assert (update.visible, update.minimum, update.maximum, update.value) == (True, 1.5, 2.5, 2.0)
    assert refresh(2.25)[1].value == 2.25 and refresh(3.0)[1].value == 2.0     # a w it still admits stays
    demo = build_app([models["teacher"], models["plain"]], votes_path=tmp_path / "votes.sqlite",
                     runs_root=tmp_path / "runs")
    s = slider(demo)
    assert (s.visible, s.minimum, s.maximum, s.value) == (True, 1.5, 2.5, 2.0)
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        assert client.predict(api_name="/compare_more_models") == ["guided-run"]
        [default] = client.predict(["guided-run"], 3, 5, 2, 2, 1.0, api_name="/compare_more")    # no w sent
        [at_25] = client.predict(["guided-run"], 3, 5, 2, 2, 1.0, 2.5, api_name="/compare_more")
        assert default["caption"].startswith("guided-run: NFE 1, steps 1, w=2.0, ")
        assert at_25["caption"].startswith("guided-run: NFE 1, steps 1, w=2.5, ")
        with pytest.raises(AppError, match=r"between 1.5 and 2.5 \(guided-run's range\), got 3"):
            client.predict(["guided-run"], 3, 5, 2, 2, 1.0, 3, api_name="/compare_more")
        # The fixed panels hold no guided student: there w is not used.
        assert len(client.predict(3, 5, 1, 2, 2.0, 3, api_name="/compare")) == 4
