"""Compare's "Teacher first, down to t" control: each multi-step student that has t among its later timesteps
continues its own teacher's trajectory from t (`LoadedModel.generate(teacher_until=...)`, tests/test_handover.py),
beside the plain teacher and the other students; the rest sample as usual and say why.

The pure function on the committed MNIST models, the served app through gradio_client, and the dropdown in
headless Chromium (as tests/test_browser.py)."""

from __future__ import annotations

import os
import re

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest

from conftest import served, tiny_pixel_unet
from dmd2 import registry
from dmd2.families.pixel import save_pixel_unet
from dmd2.ui.compare import _handover_control, compare, handover_choices
from dmd2.ui.widgets import make_grid

MNIST = ["mnist-teacher", "mnist-dmd2-1step", "mnist-dmd2-2step", "mnist-dmd2-4step-last"]
STEPS = 10          # the teacher's grid: 999, 899, 799, ... (to 749: three passes, the last move lands on 749)


def run(models, teacher_until, **kw):
    args = dict(label=3, seed=11, num_images=2, steps=STEPS, guidance=None)
    return compare(models, teacher_until=teacher_until, **{**args, **kw})


def generated(name, **kw):
    return make_grid(registry.load(name).generate([3, 3], 11, **kw).images)


def test_students_with_the_timestep_sample_teacher_then_student():
    """Each hybrid panel is `generate(teacher_until=...)` at the tab's teacher steps (that its handover state is the
    teacher's own DDIM state is tests/test_handover.py's)."""
    (t_img, t_cap), (one_img, one_cap), (two_img, two_cap), (four_img, four_cap) = run(MNIST, 749)
    # the hybrids: the student's own teacher on the tab's grid down to 749, then the student's remaining steps
    assert np.array_equal(two_img, generated("mnist-dmd2-2step", teacher_until=749, teacher_steps=STEPS))
    assert np.array_equal(four_img, generated("mnist-dmd2-4step-last", teacher_until=749, teacher_steps=STEPS))
    assert not np.array_equal(two_img, generated("mnist-dmd2-2step"))
    assert re.fullmatch(r"mnist-dmd2-2step: NFE 4, steps 1, \d+ ms \(teacher first: 3 steps at w=1 down to t=749, "
                        r"NFE 3; then 1 student step\)", two_cap)
    assert re.fullmatch(r"mnist-dmd2-4step-last: NFE 6, steps 3, \d+ ms \(teacher first: 3 steps at w=1 down to "
                        r"t=749, NFE 3; then 3 student steps\)", four_cap)
    # the teacher and the 1-step student are as without the control; the student says why
    assert np.array_equal(t_img, generated("mnist-teacher", steps=STEPS))
    assert t_cap.startswith("mnist-teacher: NFE 10, steps 10, ") and t_cap.endswith(" ms")
    assert np.array_equal(one_img, generated("mnist-dmd2-1step"))
    assert one_cap.endswith(" ms (1-step: sampled as usual)")


def test_a_timestep_only_some_students_have():
    _, _, (two_img, two_cap), (four_img, four_cap) = run(MNIST, "249")        # the dropdown sends strings
    assert np.array_equal(two_img, generated("mnist-dmd2-2step"))
    assert two_cap.endswith("(t=249 is not one of its later timesteps (749): sampled as usual)")
    assert np.array_equal(four_img, generated("mnist-dmd2-4step-last", teacher_until=249, teacher_steps=STEPS))
    assert four_cap.startswith("mnist-dmd2-4step-last: NFE 9, steps 1, ")                  # 999 ... 299, then 249
    assert four_cap.endswith("(teacher first: 8 steps at w=1 down to t=249, NFE 8; then 1 student step)")


def test_the_hybrids_teacher_takes_the_tabs_guidance():
    """The teacher panel and the hybrids' teacher part both at the tab's CFG scale (two passes a step)."""
    (t_img, t_cap), (two_img, two_cap) = run([MNIST[0], MNIST[2]], 749, guidance=2.0)
    assert t_cap.startswith("mnist-teacher: NFE 20, steps 10, ")
    assert two_cap.startswith("mnist-dmd2-2step: NFE 7, steps 1, ")                        # 3 x 2 + 1
    assert two_cap.endswith("(teacher first: 3 steps at w=2 down to t=749, NFE 6; then 1 student step)")
    assert np.array_equal(two_img, generated("mnist-dmd2-2step", teacher_until=749, teacher_steps=STEPS,
                                             teacher_guidance=2.0))
    assert not np.array_equal(two_img, run([MNIST[2]], 749)[0][0])


@pytest.mark.parametrize("off", [None, "off", "Off", "", " "])
def test_off_is_the_plain_comparison(off):
    plain = run(MNIST[1:3], None)
    got = run(MNIST[1:3], off)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(plain, got))
    assert [c.split(" ms")[0].rsplit(", ", 1)[0] for _, c in got] == ["mnist-dmd2-1step: NFE 1, steps 1",
                                                                      "mnist-dmd2-2step: NFE 2, steps 2"]
    assert all("sampled as usual" not in c for _, c in got)


@pytest.mark.parametrize("bad, message", [
    ("abc", "teacher first, down to t must be an integer, got 'abc'"),
    (7.5, "teacher first, down to t must be an integer, got 7.5"),
    (0, "teacher first, down to t must be between 1 and 999, got 0"),
    (1000, "teacher first, down to t must be between 1 and 999, got 1000"),
    (True, "teacher first, down to t must be an integer, got True"),
])
def test_bad_values_are_refused_by_name_before_sampling(bad, message, monkeypatch):
    sampled = []      # (compare turns a model's exception into its caption: record the calls instead)
    monkeypatch.setattr(registry.LoadedModel, "generate", lambda *a, **k: sampled.append(a))
    with pytest.raises(ValueError, match=re.escape(message)):
        run(MNIST, bad)
    assert sampled == []


def test_a_student_whose_teacher_does_not_load_samples_as_usual_and_says_why(tmp_path):
    import json
    import shutil

    lost = tmp_path / "lost-teacher-student"
    shutil.copytree(registry.ASSETS / "mnist" / "dmd2-2step", lost)
    meta = json.loads((lost / "dmd2.json").read_text())
    (lost / "dmd2.json").write_text(json.dumps({**meta, "teacher": str(tmp_path / "gone")}))
    (img, cap), (ok_img, ok_cap) = run([str(lost), "mnist-dmd2-4step-last"], 749)
    assert np.array_equal(img, make_grid(registry.load(str(lost)).generate([3, 3], 11).images))
    assert cap.startswith("lost-teacher-student: NFE 2, steps 2, ")
    assert "(no teacher to start from: " in cap and "does not load" in cap and cap.endswith("; sampled as usual)")
    assert ok_cap.endswith("(teacher first: 3 steps at w=1 down to t=749, NFE 3; then 3 student steps)")


def test_the_control_offers_the_students_later_timesteps():
    assert handover_choices(MNIST) == [749, 499, 249]
    assert handover_choices(["mnist-teacher", "mnist-dmd2-1step", "no-such-model"]) == []
    assert _handover_control(MNIST) == dict(choices=["off", "749", "499", "249"], value="off", visible=True)
    assert _handover_control(MNIST, 499)["value"] == "499"
    assert _handover_control(MNIST[:3], 499)["value"] == "off"          # no longer offered: back to off
    assert _handover_control(MNIST[:2])["visible"] is False


# --- the served app ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    """A tiny random teacher, a 2-step student of it (its dmd2.json names it) and a 1-step one, served."""
    from dmd2.ui.app import build_app

    root = tmp_path_factory.mktemp("handover-app")
    unet = tiny_pixel_unet()
    save_pixel_unet(unet, root / "tiny-teacher")
    save_pixel_unet(unet, root / "tiny-2step", timesteps=[999, 499], teacher=str(root / "tiny-teacher"))
    save_pixel_unet(unet, root / "tiny-1step", timesteps=[999], teacher=str(root / "tiny-teacher"))
    models = [str(root / n) for n in ("tiny-teacher", "tiny-2step", "tiny-1step")]
    demo = build_app(models, votes_path=root / "votes.sqlite", runs_root=root / "runs")
    with served(demo) as url:
        yield dict(url=url, models=models, root=root)


def test_app_compare_endpoint_takes_the_handover(tiny_app, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(tiny_app["url"], verbose=False, download_files=str(tmp_path))
    out = client.predict(2, 5, 1, 4, 1.0, None, "499", api_name="/compare")
    assert out[3].startswith("tiny-2step: NFE 3, steps 1, ")
    assert out[3].endswith("(teacher first: 2 steps at w=1 down to t=499, NFE 2; then 1 student step)")
    assert out[5].endswith("(1-step: sampled as usual)")
    for plain in (client.predict(2, 5, 1, 4, 1.0, api_name="/compare"),        # the trailing inputs left out: off
                  client.predict(2, 5, 1, 4, 1.0, None, api_name="/compare")):
        assert plain[3].startswith("tiny-2step: NFE 2, steps 2, ") and plain[3].endswith(" ms")
    with pytest.raises(AppError, match="teacher first, down to t must be between 1 and 999, got 1000"):
        client.predict(2, 5, 1, 4, 1.0, None, 1000, api_name="/compare")


def test_browser_dropdown_hands_the_2step_student_over(tiny_app, tmp_path):
    from playwright.sync_api import expect

    from test_browser import ARTIFACTS, chromium_context

    with chromium_context(tmp_path / "profile") as context:
        page = context.new_page()
        page.goto(tiny_app["url"])
        page.locator("#compare-handover input").click()
        page.get_by_role("option", name="499", exact=True).click()
        page.get_by_role("button", name="Generate", exact=True).click()
        expect(page.get_by_text(re.compile(r"^tiny-2step: NFE 26, steps 1, \d+ ms \(teacher first: 25 steps at w=1 "
                                           r"down to t=499, NFE 25; then 1 student step\)$"))).to_be_visible()
        expect(page.get_by_text(re.compile(r"^tiny-1step: NFE 1, steps 1, \d+ ms \(1-step: sampled as usual\)$"))
               ).to_be_visible()
        page.screenshot(path=str(ARTIFACTS / "compare-handover.png"), full_page=True)


def test_a_finished_multistep_run_brings_the_control(tiny_app, tmp_path):
    """The fixed panels offer no handover; a 2-step run that finishes while the app runs does (Refresh list), and
    the "Also compare" gallery takes it."""
    import json

    from gradio_client import Client

    from dmd2.ui.app import build_app

    teacher, _, one_step = tiny_app["models"]
    runs = tmp_path / "runs"
    demo = build_app([teacher, one_step], votes_path=tmp_path / "votes.sqlite", runs_root=runs)
    [control] = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "compare-handover"]
    assert control.visible is False
    (runs / "two-run").mkdir(parents=True)
    (runs / "two-run" / "status.json").write_text(json.dumps({"state": "finished"}))
    save_pixel_unet(tiny_pixel_unet(), runs / "two-run" / "student", timesteps=[999, 499], teacher=teacher)
    [refresh] = [f.fn for f in demo.fns.values() if f.name == "choices"]
    assert refresh(None, "off")[2].choices == [("off", "off"), ("499", "499")]
    assert refresh(None, "499")[2].value == "499"
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        [hybrid] = client.predict(["two-run"], 3, 5, 1, 4, 1.0, None, "499", api_name="/compare_more")
        assert hybrid["caption"].startswith("two-run: NFE 3, steps 1, ") and "(teacher first: 2 steps" in hybrid["caption"]
        [plain] = client.predict(["two-run"], 3, 5, 1, 4, 1.0, api_name="/compare_more")    # w and t left out
        assert plain["caption"].startswith("two-run: NFE 2, steps 2, ")


def test_a_text_student_hands_over_in_compare(tmp_path, monkeypatch):
    """A tiny SDXL 2-step student in Compare: its base pipeline's UNet at the tab's steps and CFG, then the student."""
    import torch

    import tiny_sd
    from dmd2.families.sdxl import SDXLFamily

    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})
    monkeypatch.setattr(registry, "_base_teachers", {})
    sdxl = tiny_sd.make_tiny_sdxl(tmp_path / "tiny-sdxl")
    fam = SDXLFamily.from_pretrained(sdxl)
    torch.manual_seed(1)
    fam.save_student(fam.unet_from_state_dict(tiny_sd.tiny_unet(sdxl=True).state_dict()), tmp_path / "student",
                     timesteps=[999, 499])
    [(img, cap)] = compare([str(tmp_path / "student")], label="a red dog", seed=3, num_images=1, steps=4,
                           guidance=5.0, teacher_until="499")
    want = registry.load(str(tmp_path / "student")).generate(prompts=["a red dog"], seed=3, teacher_until=499,
                                                             teacher_steps=4, teacher_guidance=5.0)
    assert np.array_equal(img, make_grid(want.images))
    assert ": NFE 5, steps 1, " in cap                                  # teacher at 999 and 749 with CFG, student at 499
    assert cap.endswith("(teacher first: 2 steps at w=5 down to t=499, NFE 4; then 1 student step)")
