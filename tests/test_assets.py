"""The committed embedded models: they load through the registry, sample legible digits, and carry cards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dmd2 import registry
from dmd2.metrics.mnist import evaluate_images


def test_committed_teacher_samples_legible_digits():
    teacher = registry.load("mnist-teacher")
    labels = np.arange(100) % 10
    out = teacher.generate(labels, seed=0, steps=25)
    assert out.images.shape == (100, 32, 32, 1) and out.nfe == 25  # default guidance 1: no CFG pass
    result = evaluate_images(out.images, labels)
    assert result["alignment"] > 0.8  # chance is 0.1


def test_the_teacher_is_committed():
    assert "mnist-teacher" in registry.available()


@pytest.mark.parametrize("name", registry.available())
def test_every_committed_model_has_a_card_naming_its_command(name):
    spec = registry.BUILTIN[name]
    card = (spec.path / "MODEL_CARD.md").read_text()
    assert "python -m training" in card
    assert json.loads((spec.path / "config.json").read_text())["_class_name"] == "UNet2DModel"


@pytest.mark.parametrize("name", [n for n in registry.available() if registry.BUILTIN[n].kind == "student"])
def test_committed_students_sample_legible_digits_in_their_steps(name):
    student = registry.load(name)
    labels = np.arange(100) % 10
    out = student.generate(labels, seed=0)
    assert out.nfe == len(student.timesteps) and out.nfe in (1, 4)
    assert evaluate_images(out.images, labels)["alignment"] > 0.8
