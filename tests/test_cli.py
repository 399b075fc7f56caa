"""`python -m dmd2 sample/evaluate`: the documented arrays, metrics output, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_UNET
from dmd2.families.pixel import PixelFamily

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "dmd2", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A tiny random 10-class 32x32 teacher folder (the CLI accepts a model folder as --model)."""
    path = tmp_path_factory.mktemp("models") / "tiny-teacher"
    torch.manual_seed(0)
    PixelFamily().save_student(PixelFamily().new_unet(**TINY_UNET), path)
    return path


def test_sample_writes_the_documented_arrays(tiny_teacher, tmp_path):
    out = tmp_path / "s.npz"
    r = run("sample", "--model", str(tiny_teacher), "--num", "13", "--seed", "3", "--out", str(out), "--steps", "2")
    assert r.returncode == 0, r.stderr
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (13, 32, 32, 1)
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [i % 10 for i in range(13)]
    again = tmp_path / "again.npz"
    run("sample", "--model", str(tiny_teacher), "--num", "13", "--seed", "3", "--out", str(again), "--steps", "2")
    assert np.array_equal(np.load(again)["images"], data["images"])
    other = tmp_path / "other.npz"
    run("sample", "--model", str(tiny_teacher), "--num", "13", "--seed", "4", "--out", str(other), "--steps", "2")
    assert not np.array_equal(np.load(other)["images"], data["images"])


def test_evaluate_prints_and_writes_metrics(tiny_teacher, tmp_path):
    out = tmp_path / "m.json"
    r = run("evaluate", "--model", str(tiny_teacher), "--num", "20", "--steps", "2", "--guidance", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for key in ("fid", "alignment", "diversity", "nfe", "ms_per_image"):
        assert key in r.stdout
    result = json.loads(out.read_text())
    assert result["nfe"] == 4  # 2 DDIM steps x 2 passes for classifier-free guidance
    assert result["num"] == 20 and result["fid"] > 0 and 0 <= result["alignment"] <= 1


def test_evaluate_per_step_scores_each_step_of_a_multi_step_student(tiny_teacher, tmp_path):
    torch.manual_seed(1)
    student = tmp_path / "tiny-4step"
    PixelFamily().save_student(PixelFamily().new_unet(**TINY_UNET), student, timesteps=[999, 749, 499, 249],
                               family="pixel", teacher=str(tiny_teacher))
    out = tmp_path / "m.json"
    r = run("evaluate", "--model", str(student), "--num", "20", "--per-step", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "step 4 (t=249)" in r.stdout
    result = json.loads(out.read_text())
    rows = result["per_step"]
    assert [(row["step"], row["t"]) for row in rows] == [(1, 999), (2, 749), (3, 499), (4, 249)]
    assert rows[-1]["fid"] == pytest.approx(result["fid"])           # the last step's estimate is the sample
    assert len({round(row["fid"], 6) for row in rows}) == 4          # each step scored on its own images
    assert len({round(row["autoencoder_fid"], 6) for row in rows}) == 4  # the second space, each step its own
    assert all(0 <= row[k] <= 1 for row in rows for k in ("classifier_recall", "autoencoder_precision"))
    r = run("evaluate", "--model", str(tiny_teacher), "--num", "4", "--per-step")
    assert r.returncode != 0 and "--per-step scores each step of a multi-step student" in r.stderr
    r = run("evaluate", "--model", str(student), "--num", "3", "--per-step")  # too few for recall: "-", no crash
    assert r.returncode == 0, r.stderr
    assert "classifier_recall -" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["sample", "--model", "no-such-model", "--out", "{tmp}/x.npz"], "unknown model"),
    (["sample", "--model", "{teacher}", "--label", "12", "--num", "2", "--out", "{tmp}/x.npz"], "--label must be in 0..9"),
    (["sample", "--model", "{teacher}", "--steps", "0", "--out", "{tmp}/x.npz"], "--steps must be at least 1"),
    (["sample", "--model", "{teacher}", "--num", "-3", "--out", "{tmp}/x.npz"], "--num must be >= 0"),
    (["sample", "--model", "{teacher}", "--num", "2", "--out", "{tmp}/no/such/dir/x.npz"], "does not exist"),
    (["sample", "--model", "{corrupt}", "--num", "2", "--out", "{tmp}/x.npz"], "could not load"),
    (["evaluate", "--model", "{teacher}", "--num", "1"], "--num must be at least 2"),
])
def test_bad_inputs_give_one_clear_line(tiny_teacher, tmp_path, args, message):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_teacher / "config.json").read_text())
    (corrupt / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 10)
    args = [a.format(tmp=tmp_path, teacher=tiny_teacher, corrupt=corrupt) for a in args]
    r = run(*args)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # One error line (argparse adds its usage lines above it).
    assert sum("error" in line for line in r.stderr.splitlines()) == 1


def test_unwritable_output_is_refused(tiny_teacher):
    # /sys refuses new files even for root, unlike a chmod-ed folder.
    r = run("sample", "--model", str(tiny_teacher), "--num", "2", "--out", "/sys/dmd2-test.npz")
    assert r.returncode != 0 and "cannot write output file" in r.stderr and "Traceback" not in r.stderr


def test_grid_writes_one_column_per_class(tiny_teacher, tmp_path):
    from PIL import Image

    out = tmp_path / "g.png"
    r = run("grid", "--model", str(tiny_teacher), "--rows", "2", "--steps", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (10 * 32, 2 * 32)


def test_save_grid_creates_the_folder_and_leaves_no_temporary_file(tmp_path):
    import numpy as np
    from PIL import Image

    from dmd2.images import save_grid

    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4, 1)
    save_grid(images, tmp_path / "new" / "grid.png", cols=2)
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["grid.png"]
    grid = np.asarray(Image.open(tmp_path / "new" / "grid.png"))
    assert grid.shape == (8, 8) and (grid[:4, 4:] == images[1, ..., 0]).all() and (grid[4:, 4:] == 0).all()
