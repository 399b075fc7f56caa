"""Shared fixtures: a tiny pixel family and tiny UNets, small enough for 2 shared CPU cores."""

from __future__ import annotations

import contextlib
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from dmd2.families.pixel import PixelFamily

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(demo):
    """Serve a gradio app on a free localhost port for the block's duration; yields its URL."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()

TINY_UNET = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=8,
    layers_per_block=1,
)


@pytest.fixture
def family() -> PixelFamily:
    """3 classes (+ null class 3), 1 channel, 8x8 images, cosine schedule, v-prediction."""
    return PixelFamily(num_classes=3, image_size=8, channels=1)


@pytest.fixture
def make_unet(family):
    """Factory of tiny randomly initialised UNets for `family`, seeded, in eval mode."""

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return family.new_unet(**dict(TINY_UNET, **overrides)).eval()

    return make


@pytest.fixture
def unet(make_unet):
    return make_unet(0)


def write_png(path, array) -> None:
    """Save a uint8 array (H, W) or (H, W, 3) as a PNG, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def make_two_class_folder(root, per_class: int = 6):
    """root/<class>/<png>, 16x16: 'left' images have a bright left half, 'right' ones a bright right half."""
    rng = np.random.default_rng(0)
    for name, cols in (("left", slice(0, 8)), ("right", slice(8, 16))):
        for i in range(per_class):
            img = rng.integers(0, 40, size=(16, 16))
            img[:, cols] = rng.integers(200, 256, size=(16, 8))
            write_png(root / name / f"{i}.png", img)
    return root


@pytest.fixture
def two_class_folder(tmp_path):
    return make_two_class_folder(tmp_path / "images")


CAPTIONS = ["a photo of a cat", "a red dog", "a blue cat", "a dog", "a photo of a red cat"]


def make_caption_folder(root, captions=CAPTIONS, size=(24, 20)):
    """root/<i>.png (random RGB, not square) + metadata.jsonl in the Hugging Face imagefolder layout."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i, text in enumerate(captions):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": text}) + "\n")
    return root


def tiny_pixel_unet(seed: int = 0):
    """A tiny random 10-class 32x32 pixel UNet (no attention): fast enough for live-app tests."""
    torch.manual_seed(seed)
    return PixelFamily().new_unet(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                  attention_head_dim=8)


def make_tiny_students(root) -> list[str]:
    """Two tiny random pixel students of one UNet under `root` (1 and 2 steps: fast arena rounds)."""
    from dmd2.families.pixel import save_pixel_unet

    unet = tiny_pixel_unet()
    save_pixel_unet(unet, root / "tiny-1step", timesteps=[999])
    save_pixel_unet(unet, root / "tiny-2step", timesteps=[999, 499])
    return [str(root / "tiny-1step"), str(root / "tiny-2step")]


def write_run(root, name, state, student=True):
    """A run folder as the trainer leaves it: status.json with `state`, and (if `student`) a tiny pixel student."""
    from dmd2.families.pixel import save_pixel_unet

    run = root / name
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": state}))
    if student:
        save_pixel_unet(tiny_pixel_unet(), run / "student", timesteps=[999])
    return run


def write_broken_model(folder, like):
    """A model folder with `like`'s config (and dmd2.json, if any) but weights that fail to load."""
    folder.mkdir()
    for name in ("config.json", "dmd2.json"):
        if (like / name).is_file():
            (folder / name).write_text((like / name).read_text())
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture(autouse=True, scope="session")
def _isolated_runs_root(tmp_path_factory):
    """No test sees the developer's runs/: the app's Train tab and run listing default to an empty folder
    (session-wide, so module-scoped app fixtures get it too; tests that need runs pass their own root)."""
    import os

    # The app's launches may read only from allowed folders (training/launch_limits.py): the tests' tiny
    # teachers and data live under pytest's temporary folder.
    saved = {key: os.environ.get(key) for key in ("DMD2_RUNS", "DMD2_DATA_ROOTS")}
    os.environ["DMD2_RUNS"] = str(tmp_path_factory.mktemp("runs-root"))
    os.environ["DMD2_DATA_ROOTS"] = str(tmp_path_factory.getbasetemp())
    yield
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def tiny_distill_config(setup, **overrides):
    """A 10-iteration DMD2 config (TTUR 5, checkpoints every 5) on `setup`'s (teacher folder, image folder)."""
    from training.config import DistillConfig

    teacher, data = setup
    base = dict(teacher=str(teacher), data=str(data), batch_size=4, iterations=10, ttur=5, warmup_steps=2,
                log_every=1, sample_every=0, eval_every=0, checkpoint_every=5, mixed_precision="no",
                generator_lr=1e-3, critic_lr=1e-3, real_guidance=2.0)
    base.update(overrides)
    return DistillConfig(**base).validate()


def assert_resumes_bit_identically(cfg, tmp_path, stop_after: int):
    """Runs `cfg` straight through, and again stopped after `stop_after` iterations then resumed from its checkpoint;
    the two generators must be equal bit for bit. Returns the straight run (its metrics for the caller to check)."""
    import torch

    from training.distill import distill

    straight = distill(cfg, tmp_path / "straight")
    distill(cfg, tmp_path / "split", stop_after=stop_after)
    resumed = distill(cfg, tmp_path / "split", resume=True).trainer.state_dict()
    for name, tensor in straight.trainer.state_dict()["generator"].items():
        assert torch.equal(tensor, resumed["generator"][name]), f"generator.{name} differs after resume"
    return straight


@pytest.fixture
def setup(tmp_path, family):
    """A tiny random teacher saved in diffusers format and a two-class image folder, as (teacher, images): what
    `tiny_distill_config` takes. A module that needs another teacher defines its own `setup`, which wins."""
    torch.manual_seed(0)
    family.save_student(family.new_unet(**TINY_UNET), tmp_path / "teacher")
    return tmp_path / "teacher", make_two_class_folder(tmp_path / "images")
