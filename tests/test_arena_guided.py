"""A guidance-conditioned student in the Arena (issue 19): it enters battles at the slider's w as
`<model>@w=<w>`, its side is sampled at that w (batched or not), and votes and names keep the w."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_pixel_unet
from dmd2 import registry
from dmd2.arena import VoteStore
from dmd2.batching import Batcher
from dmd2.families.pixel import PixelFamily
from dmd2.guidance import entry_name, parse_entry
from dmd2.ui.arena import Arena
from dmd2.ui.widgets import display_name


def make_guided_student(folder, low=1.0, high=3.0, default=1.5):
    """A tiny random pixel student that takes w as an input (a non-zero projection, so w matters)."""
    family = PixelFamily()
    guided = family.guidance_conditioned(tiny_pixel_unet(), 16)
    torch.manual_seed(1)
    torch.nn.init.normal_(guided.time_embedding.cond_proj.weight, std=1.0)
    family.save_student(guided, folder, timesteps=[999], guidance_range=[low, high], guidance_default=default)
    return str(folder)


@pytest.fixture
def models(tmp_path):
    plain = tmp_path / "plain"
    PixelFamily().save_student(tiny_pixel_unet(), plain, timesteps=[999])
    return [str(plain), make_guided_student(tmp_path / "guided")]


def test_entry_names_round_trip_and_display():
    assert entry_name("runs/a/student", 2) == "runs/a/student@w=2"
    assert parse_entry("runs/a/student@w=2.5") == ("runs/a/student", 2.5)
    assert parse_entry("mnist-teacher") == ("mnist-teacher", None)
    assert parse_entry("odd@w=x") == ("odd@w=x", None)
    assert display_name("runs/a/student@w=2.5") == "a (w=2.5)"


@pytest.mark.parametrize("batched", [False, True])
def test_a_guided_student_battles_at_the_chosen_w(models, tmp_path, batched):
    plain, guided = models
    arena = Arena(models, VoteStore(tmp_path / "votes.sqlite"), rng=np.random.default_rng(0), bf16=False,
                  batcher=Batcher(slots=1) if batched else None)
    assert arena.entries() == [plain, entry_name(guided, 1.5)]     # its default w
    r = arena.new_round("3", guidance=2.5)
    battle = arena.book.verify(r.token)
    names = {battle['model_a'], battle['model_b']}
    assert names == {plain, f"{guided}@w=2.5"}
    side = r.image_a if battle['model_a'] != plain else r.image_b
    m = registry.load(guided)
    at_25 = m.generate([3] * 4, battle['seed'], guidance=2.5).images
    at_1 = m.generate([3] * 4, battle['seed'], guidance=1.0).images
    assert not (at_25 == at_1).all()
    # The side's 2 x 2 grid holds the four images sampled at w = 2.5 (each upscaled by the same factor).
    scale = side.shape[0] // (2 * at_25.shape[1])
    assert (side[:at_25.shape[1] * scale:scale, :at_25.shape[2] * scale:scale] == at_25[0, ..., 0]).all()
    v = arena.vote(r.token, "a", "session:x")
    assert {v.model_a, v.model_b} == {display_name(plain), "guided (w=2.5)"}
    with pytest.raises(ValueError, match=r"between 1 and 3 \(guided's range\)"):
        arena.new_round("3", guidance=4.0)


def test_the_arena_tab_offers_the_w_slider_only_with_a_guided_student(models, tmp_path):
    import gradio as gr

    from dmd2.ui.arena import build_arena_tab

    for served, expected in ((models, (1.0, 3.0, 1.5)), (models[:1] * 2, None)):  # one guided student; none
        with gr.Blocks() as demo:
            build_arena_tab(Arena(served, VoteStore(tmp_path / "v.sqlite"), bf16=False))
        sliders = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "arena-guidance"]
        if expected is None:
            assert not sliders
        else:
            (s,) = sliders
            assert (s.minimum, s.maximum, s.value) == expected
