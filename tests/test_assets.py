"""The committed embedded models: they load through the registry, sample legible digits, and carry cards."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dmd2 import registry
from dmd2.metrics.mnist import evaluate_images
from training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def load_script(name: str):
    """A script of scripts/ imported as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_teacher_samples_legible_digits():
    teacher = registry.load("mnist-teacher")
    labels = np.arange(100) % 10
    out = teacher.generate(labels, seed=0, steps=25)
    assert out.images.shape == (100, 32, 32, 1) and out.nfe == 25  # default guidance 1: no CFG pass
    result = evaluate_images(out.images, labels)
    assert result["alignment"] > 0.8  # chance is 0.1


def test_committed_flow_teacher_is_a_flow_model_that_samples_legible_digits():
    teacher = registry.load("mnist-flow-teacher")
    assert teacher.family.schedule.kind == "flow" and teacher.family.prediction_type == "flow"
    labels = np.arange(100) % 10
    out = teacher.generate(labels, seed=0, steps=25)
    assert out.nfe == 25
    assert evaluate_images(out.images, labels)["alignment"] > 0.8


def test_the_teacher_is_committed():
    assert "mnist-teacher" in registry.available()


@pytest.mark.parametrize("name", registry.available())
def test_every_committed_model_has_a_card_naming_its_command(name):
    spec = registry.BUILTIN[name]
    card = (spec.path / "MODEL_CARD.md").read_text()
    assert "python -m training" in card
    assert json.loads((spec.path / "config.json").read_text())["_class_name"] in ("UNet2DModel", "GuidedUNet2DModel")


@pytest.mark.parametrize("name", [n for n in registry.available() if registry.BUILTIN[n].kind == "student"])
def test_every_students_card_names_its_training_seed_and_wall_time(name):
    """Issue 18: a card gives the command, the seed and the wall time; the seed as the saved config has it."""
    spec = registry.BUILTIN[name]
    card = (spec.path / "MODEL_CARD.md").read_text()
    seed = yaml.safe_load((spec.path / "distill_config.yaml").read_text())["seed"]
    named = re.findall(r"training seed:? (\d+)", card, flags=re.IGNORECASE)
    assert named and {int(s) for s in named} == {seed}, (name, named, seed)
    assert "wall time" in card.lower()


@pytest.mark.parametrize("name", [n for n in registry.available() if registry.BUILTIN[n].kind == "student"])
def test_committed_students_sample_legible_digits_in_their_steps(name):
    student = registry.load(name)
    labels = np.arange(100) % 10
    out = student.generate(labels, seed=0)
    assert out.nfe == len(student.timesteps) and out.nfe in (1, 2, 4)
    assert evaluate_images(out.images, labels)["alignment"] > 0.8


def test_denoise_probe_scores_the_teachers_one_step_denoising(capsys):
    mod = load_script("denoise_probe")

    real, t999, t249 = mod.probe(["mnist-teacher"], [999, 249], num=64)
    assert real["model"] == "real digits" and 0.05 < real["ink"] < 0.2  # MNIST: about a tenth of the pixels are ink
    # Little noise: the teacher restores the digit almost exactly and keeps its ink; pure noise: it cannot.
    assert t249["mse"] < 0.02 and abs(t249["ink"] - real["ink"]) < 0.01
    assert t999["mse"] > 5 * t249["mse"]
    with pytest.raises(ValueError, match="timestep 1000"):
        mod.probe(["mnist-teacher"], [1000], num=8)
    mod.main(["--models", "mnist-teacher", "--t", "249", "--num", "8"])
    assert "| mnist-teacher | 249 |" in capsys.readouterr().out


def test_average_weights_writes_the_mean_of_students_and_checkpoints(tmp_path):
    from dmd2.families.pixel import load_pixel_unet

    mod = load_script("average_weights")

    assets = Path(__file__).resolve().parent.parent / "assets" / "mnist"
    four, one = (load_pixel_unet(assets / name).state_dict() for name in ("dmd2-4step", "dmd2-1step"))
    out = mod.average([str(assets / "dmd2-4step"), str(assets / "dmd2-1step")], assets / "dmd2-4step", tmp_path / "soup")
    mean = load_pixel_unet(out).state_dict()
    assert not torch.equal(four["conv_in.weight"], one["conv_in.weight"])
    for k, v in mean.items():
        torch.testing.assert_close(v, (four[k] + one[k]) / 2)
    assert json.loads((out / "dmd2.json").read_text())["timesteps"] == [999, 749, 499, 249]  # from --like

    # A checkpoint folder: its EMA by default, FOLDER:generator for the raw generator.
    ckpt = tmp_path / "step-00000010"
    ckpt.mkdir()
    torch.save({"ema": four, "generator": one}, ckpt / "state.pt")
    raw = mod.average([f"{ckpt}:generator", str(ckpt)], assets / "dmd2-1step", tmp_path / "mix")
    assert all(torch.allclose(v, mean[k]) for k, v in load_pixel_unet(raw).state_dict().items())
    assert json.loads((raw / "dmd2.json").read_text())["timesteps"] == [999]

    # --weights: a weighted mean, normalised to sum 1.
    mod.main([str(assets / "dmd2-4step"), str(assets / "dmd2-1step"), "--like", str(assets / "dmd2-4step"),
              "--out", str(tmp_path / "wise"), "--weights", "3", "1"])
    for k, v in load_pixel_unet(tmp_path / "wise").state_dict().items():
        torch.testing.assert_close(v, 0.75 * four[k] + 0.25 * one[k])
    for bad in ([1], [1, -1]):
        with pytest.raises(ValueError, match="one non-negative number per source"):
            mod.average([str(ckpt), str(ckpt)], assets / "dmd2-4step", tmp_path / "z", weights=bad)
    with pytest.raises(FileExistsError, match="already exists"):
        mod.average([str(ckpt)], assets / "dmd2-4step", out)
    with pytest.raises(ValueError, match="only applies to a checkpoint folder"):
        mod.average([f"{assets / 'dmd2-4step'}:generator"], assets / "dmd2-4step", tmp_path / "x")
    torch.save({"ema": None, "generator": one}, ckpt / "state.pt")
    with pytest.raises(ValueError, match="has no 'ema' weights"):
        mod.average([str(ckpt)], assets / "dmd2-4step", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mixed_steps_reproduces_the_evaluators_samples_and_swaps_the_first_step(tmp_path):
    from dmd2.sampling import generate_many

    mod = load_script("mixed_steps")

    # No option: exactly the evaluator's samples (same noise, labels and fresh-noise seeds, two batches).
    four = registry.load("mnist-dmd2-4step")
    images, labels = mod.sample("mnist-dmd2-4step", num=12, seed=3, batch_size=6)
    expected, expected_labels, _, _ = generate_many(four, 12, seed=3, batch_size=6)
    assert np.array_equal(labels, expected_labels) and np.array_equal(images, expected)
    # The 1-step student's first step and no later step: the 1-step student's samples.
    one = registry.load("mnist-dmd2-1step")
    images, _ = mod.sample("mnist-dmd2-4step", first="mnist-dmd2-1step", timesteps=[], num=6, seed=3)
    assert np.array_equal(images, generate_many(one, 6, seed=3)[0])
    # ... then the 4-step student's last step: different images, made by --model's network, not --first's.
    mixed, _ = mod.sample("mnist-dmd2-4step", first="mnist-dmd2-1step", timesteps=[249], num=6, seed=3)
    assert not np.array_equal(mixed, images)
    one_only, _ = mod.sample("mnist-dmd2-1step", first="mnist-dmd2-1step", timesteps=[249], num=6, seed=3)
    assert not np.array_equal(mixed, one_only)

    with pytest.raises(ValueError, match="not a student"):
        mod.sample("mnist-teacher", num=2)
    with pytest.raises(ValueError, match="timesteps must be in 0..999"):
        mod.sample("mnist-dmd2-4step", timesteps=[1000], num=2)
    with pytest.raises(ValueError, match="num and batch_size must be at least 1"):
        mod.sample("mnist-dmd2-4step", num=2, batch_size=0)
    out = tmp_path / "m.json"
    mod.main(["--model", "mnist-dmd2-4step", "--timesteps", "249", "--num", "20", "--json", str(out)])
    row = json.loads(out.read_text())
    assert row["nfe"] == 2 and row["timesteps"] == [249] and row["fid"] > 0
    assert row["autoencoder_fid"] > 0 and 0 <= row["classifier_recall"] <= 1   # every measure of evaluate


def test_the_guided_student_trades_diversity_for_alignment_as_w_rises():
    student = registry.load("mnist-dmd2-1step-guided")
    assert student.guided and student.guidance_range == (1.0, 3.0)
    labels = np.arange(500) % 10
    low, high = (evaluate_images(student.generate(labels, seed=0, guidance=w).images, labels) for w in (1.0, 3.0))
    assert high["alignment"] > low["alignment"] and high["diversity_ratio"] < low["diversity_ratio"] - 0.05


def test_the_2step_preset_is_the_committed_2step_students_recorded_run():
    """configs/mnist-2step.yaml holds, key for key, what the run that made assets/mnist/dmd2-2step recorded, and is
    the research config it was run as (configs/steps/mnist-2step-t749-last.yaml) under the app's preset name."""
    preset = load_config(ROOT / "configs/mnist-2step.yaml").to_dict()
    recorded = load_config(ROOT / "assets/mnist/dmd2-2step/distill_config.yaml").to_dict()
    research = load_config(ROOT / "configs/steps/mnist-2step-t749-last.yaml").to_dict()
    assert {k for k in preset if preset[k] != recorded[k]} == set()
    assert preset == research
    assert (preset["student_timesteps"], preset["step_weights"], preset["seed"]) == ([999, 749], [0, 1], 0)
    assert registry.load("mnist-dmd2-2step").timesteps == (999, 749)


def test_the_4step_preset_is_the_committed_4step_students_recorded_run():
    """configs/mnist-4step.yaml holds, key for key, what the run that made assets/mnist/dmd2-4step-last recorded, and
    is the research config it was run as (configs/steps/mnist-4step-last-only.yaml) under the app's preset name; the
    four-stage student's stage 1 (configs/mnist-4step-stage1.yaml) differs from it only in the step weights."""
    preset = load_config(ROOT / "configs/mnist-4step.yaml").to_dict()
    recorded = load_config(ROOT / "assets/mnist/dmd2-4step-last/distill_config.yaml").to_dict()
    research = load_config(ROOT / "configs/steps/mnist-4step-last-only.yaml").to_dict()
    stage1 = load_config(ROOT / "configs/mnist-4step-stage1.yaml").to_dict()
    assert {k for k in preset if preset[k] != recorded[k]} == set()
    assert preset == research
    assert {k for k in preset if preset[k] != stage1[k]} == {"step_weights"}
    assert (preset["student_timesteps"], preset["step_weights"], preset["seed"]) == (None, [0, 0, 0, 1], 0)
    assert registry.load("mnist-dmd2-4step-last").timesteps == (999, 749, 499, 249)
    assert registry.BUILTIN["mnist-dmd2-4step-last"].demo and not registry.BUILTIN["mnist-dmd2-4step"].demo


def test_the_committed_ddim_student_is_its_research_configs_seed_0_and_samples_by_ddim_moves():
    """assets/mnist/dmd2-4step-ddim is seed 0 of configs/steps/mnist-4step-ddim-w08-low.yaml, key for key, and its
    dmd2.json makes the registry's sampler move by DDIM (the way it was trained), not by fresh re-noising."""
    research = load_config(ROOT / "configs/steps/mnist-4step-ddim-w08-low.yaml").to_dict()
    recorded = load_config(ROOT / "assets/mnist/dmd2-4step-ddim/distill_config.yaml").to_dict()
    assert {k for k in research if research[k] != recorded[k]} == set()
    assert (recorded["renoise"], recorded["real_guidance"], recorded["seed"]) == ("ddim", 0.8, 0)
    student = registry.load("mnist-dmd2-4step-ddim")
    assert student.timesteps == (999, 749, 499, 249) and student.renoise == "ddim"
    assert not registry.BUILTIN["mnist-dmd2-4step-ddim"].demo
    labels = np.arange(16) % 10
    default = student.generate(labels, seed=0)
    assert default.extra.get("renoise") == "ddim"
    assert np.array_equal(default.images, student.generate(labels, seed=0, renoise="ddim").images)
    assert not np.array_equal(default.images, student.generate(labels, seed=0, renoise="fresh").images)
