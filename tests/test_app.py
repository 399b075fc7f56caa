"""The Compare tab: the pure `compare()` and the real app served on localhost, called with gradio_client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
from PIL import Image

from conftest import served, tiny_pixel_unet, write_broken_model
from dmd2 import registry
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.compare import compare, compare_steps
from dmd2.ui.widgets import make_grid

ROOT = Path(__file__).resolve().parent.parent
PAD = 2  # make_grid's default padding
STEPS = 3


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny random teacher, a 2-step 'student' made from it, and a folder that fails to load."""
    root = tmp_path_factory.mktemp("models")
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, root / "tiny-teacher")
    save_pixel_unet(unet, root / "tiny-student", timesteps=[999, 499])
    broken = write_broken_model(root / "broken", like=root / "tiny-teacher")
    return [str(root / "tiny-teacher"), str(root / "tiny-student"), str(broken)]


def grid_size(n: int, side: int = 32, scale: int = 1) -> tuple[int, int]:
    """(height, width) of make_grid's near-square grid of n side x side images."""
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    s = side * scale
    return rows * s + (rows - 1) * PAD, cols * s + (cols - 1) * PAD


# --- the pure function -------------------------------------------------------------------

def test_make_grid_places_each_image():
    images = np.stack([np.full((2, 3, 1), i, np.uint8) for i in range(5)])
    grid = make_grid(images, pad=1)
    assert grid.shape == (2 * 2 + 1, 3 * 3 + 2, 1)          # 5 images -> 3 columns, 2 rows
    assert grid[0, 0, 0] == 0 and grid[0, 4, 0] == 1 and grid[3, 0, 0] == 3 and grid[3, 4, 0] == 4
    assert grid[3, 8, 0] == 255                               # empty sixth cell stays white
    assert make_grid(images, scale=2, pad=0).shape == (8, 18, 1)


def test_compare_returns_grid_and_caption_per_model(tiny_models):
    teacher, student, broken = tiny_models
    results = compare([teacher, student, broken], label=3, seed=7, num_images=5, steps=STEPS, guidance=2.0)
    assert len(results) == 3
    (t_img, t_cap), (s_img, s_cap), (b_img, b_cap) = results
    assert t_img.shape == (*grid_size(5), 1) and t_img.dtype == np.uint8
    assert t_cap.startswith("tiny-teacher: NFE 6, steps 3, ") and t_cap.endswith(" ms")   # CFG: 2 NFE per step
    assert s_img.shape == t_img.shape
    assert s_cap.startswith("tiny-student: NFE 2, steps 2, ")
    assert b_img is None and "could not load" in b_cap and "broken" in b_cap

    again = compare([teacher], label=3, seed=7, num_images=5, steps=STEPS, guidance=2.0)[0][0]
    other = compare([teacher], label=3, seed=8, num_images=5, steps=STEPS, guidance=2.0)[0][0]
    assert np.array_equal(again, t_img)
    assert not np.array_equal(other, t_img)


def test_compare_reports_progress_to_the_end(tiny_models):
    seen = []
    compare(tiny_models[:2], 0, 0, 1, STEPS, None, progress=lambda f, desc: seen.append((f, desc)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("step 3/3" in d for _, d in seen)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), "seed must be between"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed="abc"), "seed must be an integer"),
    (dict(label=12), "class label must be in 0..9"),
    (dict(label="three"), "class label must be an integer, got 'three'"),
    (dict(steps=0), "steps must be between"),
    (dict(steps="many"), "teacher steps must be an integer, got 'many'"),
    (dict(num_images=17), "number of images must be between"),
    (dict(num_images="abc"), "number of images must be an integer, got 'abc'"),
    (dict(guidance=float("nan")), "guidance must be a finite number"),
    (dict(guidance="strong"), "teacher guidance must be a number, got 'strong'"),
])
def test_compare_rejects_bad_input(tiny_models, kwargs, message):
    args = dict(label=1, seed=0, num_images=1, steps=1, guidance=None) | kwargs
    with pytest.raises(ValueError, match=message):
        compare(tiny_models[:1], **args)


def test_compare_takes_numbers_written_as_strings(tiny_models):
    """The class is documented as '0'-'9': the string '3' is class 3, like every numeric field given as text."""
    as_text = compare(tiny_models[:1], label="3", seed="7", num_images="2", steps="2", guidance="2.0")
    as_numbers = compare(tiny_models[:1], label=3, seed=7, num_images=2, steps=2, guidance=2.0)
    assert np.array_equal(as_text[0][0], as_numbers[0][0])


def test_compare_steps_gives_students_before_the_teacher(tiny_models):
    teacher, student, broken = tiny_models
    steps = list(compare_steps([teacher, student, broken], 3, 7, 2, STEPS, 2.0))
    assert len(steps) == 3                                        # after loading, after each model that loaded
    first, second, last = steps
    assert first[0] == (None, None) and first[1] == (None, None)  # nothing sampled yet
    assert first[2][0] is None and "could not load" in first[2][1]      # a load failure shows at once
    assert second[1][1].startswith("tiny-student: NFE 2") and second[0] == (None, None)   # student first
    assert last[0][1].startswith("tiny-teacher: NFE 6") and last[1][1] == second[1][1]
    final = compare([teacher, student, broken], 3, 7, 2, STEPS, 2.0)
    assert [c for _, c in final][2] == last[2][1] and np.array_equal(final[0][0], last[0][0])


def test_compare_shows_a_load_failure_in_one_line_without_server_paths(tiny_models):
    [(img, cap)] = compare(tiny_models[2:], 0, 0, 1, 1, None)
    assert img is None and cap.startswith("broken: could not load: ")
    assert "\n" not in cap and str(Path(tiny_models[2]).parent) not in cap


def test_compare_needs_a_model():
    with pytest.raises(ValueError, match="no models"):
        compare([], 0, 0, 1, 1, None)


def test_compare_with_the_committed_teacher():
    [(img, cap)] = compare(["mnist-teacher"], label=7, seed=0, num_images=2, steps=2, guidance=None)
    assert img.shape == (*grid_size(2), 1)
    assert cap.startswith("mnist-teacher: NFE 2, steps 2, ")   # the default guidance is 1: no CFG pass


# --- the real app on localhost ---------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_models, tmp_path_factory):
    from gradio_client import Client

    from dmd2.ui.app import build_app

    demo = build_app(tiny_models)
    with served(demo) as url:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def call(client, label=2, seed=5, num_images=4, steps=STEPS, guidance=2.0):
    out = client.predict(label, seed, num_images, steps, guidance, api_name="/compare")
    assert len(out) == 6   # (image, caption) for teacher, student, broken
    return out


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_app_compare_endpoint(client):
    from dmd2.ui.widgets import DISPLAY_SCALE

    t_img, t_cap, s_img, s_cap, b_img, b_cap = call(client)
    assert pixels(t_img).shape[:2] == grid_size(4, scale=DISPLAY_SCALE)     # 2 x 2 grid, upscaled
    assert pixels(s_img).shape[:2] == grid_size(4, scale=DISPLAY_SCALE)
    assert t_cap.startswith("tiny-teacher: NFE 6, steps 3, ") and t_cap.endswith(" ms")
    assert s_cap.startswith("tiny-student: NFE 2, steps 2, ") and s_cap.endswith(" ms")
    assert b_img is None and "could not load" in b_cap

    assert np.array_equal(pixels(call(client)[0]), pixels(t_img))           # same seed, same digits
    assert not np.array_equal(pixels(call(client, seed=6)[0]), pixels(t_img))
    one = call(client, num_images=1)[0]
    assert pixels(one).shape[:2] == grid_size(1, scale=DISPLAY_SCALE)


@pytest.mark.parametrize("bad, message", [
    (dict(seed=-1), "seed must be between 0 and"),
    (dict(seed=2.5), "seed must be an integer"),
    (dict(label=12), "class label must be in 0..9 for tiny-teacher, got 12"),
    (dict(label="x"), "class label must be an integer, got 'x'"),
    (dict(steps=0), "teacher steps must be between 1 and 100, got 0"),     # the slider's range
    (dict(steps=101), "teacher steps must be between 1 and 100, got 101"),
    (dict(steps="abc"), "teacher steps must be an integer, got 'abc'"),    # was a bare "Error"
    (dict(num_images="four"), "number of images must be an integer, got 'four'"),
    (dict(guidance="high"), "teacher guidance must be a number, got 'high'"),
    (dict(guidance=9), "teacher guidance must be a finite number between 1 and 8, got 9.0"),
])
def test_app_bad_input_is_an_error_and_the_server_keeps_serving(client, bad, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        call(client, **bad)
    assert call(client, num_images=1)[1].startswith("tiny-teacher: NFE 6")


def test_app_takes_the_class_as_a_string(client):
    """'3' was refused by the dropdown's own check ("not in the list of choices"); it is class 3."""
    assert np.array_equal(pixels(call(client, label="3", num_images=1)[0]), pixels(call(client, label=3, num_images=1)[0]))
    assert call(client, label="3", seed="5", num_images="1", steps="3", guidance="2")[1].startswith("tiny-teacher: NFE 6")


def test_app_compare_streams_the_students_before_the_teacher(client):
    job = client.submit(2, 5, 1, STEPS, 2.0, api_name="/compare")
    final = job.result()
    streamed = job.outputs()
    assert streamed[-1] == final and len(final) == 6       # the last output is predict's, same shape as before
    with_student = [out for out in streamed if out[3].startswith("tiny-student: NFE 2")]
    assert with_student and with_student[0][0] is None           # the student's panel came first ...
    assert with_student[0][1] == "tiny-teacher: sampling..."     # ... while the teacher's was still sampling
    assert final[1].startswith("tiny-teacher: NFE 6") and "could not load" in final[5]


def test_app_script_sdxl_mode_names_an_unknown_model(tmp_path):
    """--family sdxl is served (tests/test_app_text.py); a model that is not there fails before launching."""
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--family", "sdxl", "--model", "no-such-model",
                        "--votes", str(tmp_path / "v.sqlite")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr


def test_default_app_has_one_panel_per_available_model():
    import gradio as gr

    from dmd2.ui.app import build_app

    demo = build_app()
    labels = [b.label for b in demo.blocks.values()
              if isinstance(b, gr.Image) and not (b.elem_id or "").startswith(("arena-", "train-"))]
    assert labels == registry.available("pixel", demo=True)  # students get a panel as soon as their weights exist


def test_the_flow_models_are_served_by_name_not_by_default():
    import gradio as gr

    from dmd2.ui.app import build_app

    flow = ["mnist-flow-teacher", "mnist-flow-dmd2-1step", "mnist-flow-dmd2-4step"]
    assert set(flow) <= set(registry.available("pixel")) and not set(flow) & set(registry.available("pixel", demo=True))
    demo = build_app(flow)
    labels = [b.label for b in demo.blocks.values()
              if isinstance(b, gr.Image) and not (b.elem_id or "").startswith(("arena-", "train-"))]
    assert labels == flow
