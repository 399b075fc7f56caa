"""The app in text-to-image mode (`python app.py --family sdxl`): Compare and Arena with a prompt box,
served on localhost with tiny SDXL pipelines as the models and called with gradio_client."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from conftest import served, tiny_pixel_unet
from dmd2.arena import VoteStore
from dmd2.families.pixel import save_pixel_unet
from dmd2.families.sdxl import SDXLFamily
from dmd2.prompts import example_prompts

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of a red cat"
GRID = (2 * 16 + 2, 2 * 16 + 2, 3)           # 4 tiny 16 px images in a 2 x 2 grid, 2 px apart, RGB


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """A tiny SDXL teacher pipeline, a 1-step student of it, and a student whose weights are broken."""
    root = tmp_path_factory.mktemp("text-app")
    teacher = tiny_sd.make_tiny_sdxl(root / "tiny-sdxl")
    fam = SDXLFamily.from_pretrained(teacher)
    torch.manual_seed(1)
    fam.save_student(fam.unet_from_state_dict(tiny_sd.tiny_unet(sdxl=True).state_dict()), root / "student-1step",
                     timesteps=[999])
    broken = root / "broken-student"
    fam.save_student(fam.load_teacher(), broken, timesteps=[999])
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return [str(teacher), str(root / "student-1step"), str(broken)]


@pytest.fixture(scope="module")
def app(text_models, tmp_path_factory):
    from dmd2.ui.app import build_app

    votes = tmp_path_factory.mktemp("votes") / "votes.sqlite"
    demo = build_app(text_models, votes_path=votes, family="sdxl")
    with served(demo) as url:
        yield demo, url, votes, tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    _, url, _, downloads = app
    return Client(url, verbose=False, download_files=str(downloads))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def compare(client, prompt=PROMPT, seed=5, num_images=4, steps=2, guidance=2.0):
    out = client.predict(prompt, seed, num_images, steps, guidance, api_name="/compare")
    assert len(out) == 6          # (image, caption) for teacher, student, broken
    return out


def test_text_app_has_a_prompt_box_and_example_prompts(app):
    import gradio as gr

    demo = app[0]
    boxes = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == "Prompt"]
    assert len(boxes) == 2 and boxes[0].value == example_prompts()[0]          # Compare and Arena
    assert not [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Class"]
    examples = example_prompts()
    assert 15 <= len(examples) <= 30 and len(set(examples)) == len(examples)
    assert all(0 < len(p) <= 100 for p in examples)


def test_text_compare_endpoint(client):
    t_img, t_cap, s_img, s_cap, b_img, b_cap = compare(client)
    assert pixels(t_img).shape == pixels(s_img).shape == GRID
    assert t_cap.startswith("tiny-sdxl: NFE 4, steps 2, ") and t_cap.endswith(" ms")    # CFG: 2 NFE per step
    assert s_cap.startswith("student-1step: NFE 1, steps 1, ")
    assert b_img is None and "could not load" in b_cap
    assert np.array_equal(pixels(compare(client)[0]), pixels(t_img))              # same prompt and seed
    assert not np.array_equal(pixels(compare(client, prompt="a blue dog")[0]), pixels(t_img))
    assert not np.array_equal(pixels(compare(client, seed=6)[2]), pixels(s_img))


@pytest.mark.parametrize("prompt, message", [
    ("   ", "the prompt is empty"),
    ("x" * 301, "the prompt is 301 characters long; at most 300"),
    ("a photo of a cat " * 3, "the prompt is 17 CLIP tokens long"),       # the tiny encoders read 16 tokens
])
def test_text_compare_refuses_bad_prompts_and_keeps_serving(client, prompt, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        compare(client, prompt=prompt)
    assert compare(client, num_images=1)[1].startswith("tiny-sdxl: NFE 4")


def test_text_arena_round_and_vote(app, client):
    from gradio_client.exceptions import AppError

    for _ in range(30):       # a round with the broken student cannot be voted on: draw until both sides work
        token, image_a, image_b, info, reveal = client.predict(PROMPT, api_name="/new_round")
        if token:
            break
        assert "cannot be voted on" in info
    assert reveal == "" and "Same prompt" in info and "tiny" not in info
    assert pixels(image_a).shape == pixels(image_b).shape == GRID
    verdict = client.predict(token, "b", api_name="/vote")
    assert {verdict["model_a"], verdict["model_b"]} <= {"tiny-sdxl", "student-1step", "broken-student"}
    assert verdict["prompt"] == PROMPT and "the same prompt" in verdict["message"]
    with VoteStore(app[2]) as store:
        assert [(v["prompt"], v["outcome"]) for v in store.votes()] == [(PROMPT, "b")]
    for bad, message in (("", "the prompt is empty"), ("y" * 400, "400 characters long"),
                         ("a photo of a cat " * 3, "17 CLIP tokens long")):
        with pytest.raises(AppError, match=message):
            client.predict(bad, api_name="/new_round")
    assert client.predict("a dog", api_name="/new_round")[4] == ""                # still serving


def test_app_script_checks_the_family_of_its_models(tmp_path):
    save_pixel_unet(tiny_pixel_unet(), tmp_path / "digits")
    r = subprocess.run([sys.executable, str(ROOT / "app.py"), "--family", "sdxl", "--model", str(tmp_path / "digits"),
                        "--votes", str(tmp_path / "v.sqlite")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a pixel model; this app serves --family sdxl" in r.stderr


def test_gpu_decorator_is_spaces_gpu_when_importable(monkeypatch):
    from dmd2.ui.gpu import gpu

    def fn(x):
        return x + 1

    monkeypatch.setitem(sys.modules, "spaces", None)          # not installed: import fails
    assert gpu(fn) is fn
    seen = []
    fake = types.SimpleNamespace(GPU=lambda f=None, duration=None: (
        seen.append(("GPU", duration)) or (lambda g: g)) if f is None else (seen.append(("GPU", None)) or f))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert gpu(fn)(1) == 2 and gpu(fn, duration=120)(1) == 2
    assert seen == [("GPU", None), ("GPU", 120)]
