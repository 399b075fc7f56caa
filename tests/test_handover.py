"""Teacher-then-student samples (`teacher_until`): the student's own teacher runs its DDIM trajectory from the
starting noise down to one of the student's later timesteps, and the student finishes from there."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tiny_sd
from dmd2 import registry
from dmd2.__main__ import main
from dmd2.families.base import ModelLoadError
from dmd2.families.sdxl import SDXLFamily
from dmd2.images import to_uint8
from dmd2.registry import ASSETS
from dmd2.sampling import (ddim_move, ddim_sample, ddim_until, handover_timesteps, initial_noise, renoise_seed,
                           student_sample)

LABELS = np.arange(6) % 10


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})
    monkeypatch.setattr(registry, "_base_teachers", {})


def test_handover_timesteps_are_the_teachers_grid_above_the_handover(family):
    sched = family.schedule
    assert handover_timesteps(sched, 749, 50) == list(range(999, 758, -20))       # 999, 979, ..., 759: 13
    assert handover_timesteps(sched, 759, 50) == list(range(999, 778, -20))       # 759 itself is the landing
    assert handover_timesteps(sched, 749, 4) == [999]
    assert handover_timesteps(sched, 249, 4) == [999, 749, 499]
    with pytest.raises(ValueError, match="above 999"):
        handover_timesteps(sched, 999, 50)


def test_ddim_until_is_the_teachers_own_trajectory(family, make_unet):
    """On the grid, the handover state is the state DDIM passes through; off it, the last move lands on `until`."""
    unet, cond = make_unet(0), family.condition(np.array([0, 1, 2]))
    z = initial_noise(family, 3, 0)
    grid = family.schedule.sampling_timesteps(10)                                 # 999, 899, ..., 99
    by_hand = z
    for t, t_next in zip(grid[:3], grid[1:4]):                                    # 999 -> 899 -> 799 -> 699
        by_hand = ddim_move(family.schedule, by_hand, family.denoise(unet, by_hand, t, cond, 1.5).float(), t, t_next)
    assert torch.allclose(ddim_until(family, unet, cond, z, 699, 10, 1.5), by_hand)
    # off the grid: 999, 899, 799 evaluated, the move from 799 lands on 749
    x = z
    for t, t_next in ((999, 899), (899, 799), (799, 749)):
        x = ddim_move(family.schedule, x, family.denoise(unet, x, t, cond, 1.5).float(), t, t_next)
    assert torch.allclose(ddim_until(family, unet, cond, z, 749, 10, 1.5), x)
    # the guidance reaches the teacher's passes
    assert not torch.allclose(ddim_until(family, unet, cond, z, 749, 10, 1.0), x)
    # handing over at the grid's last point and taking DDIM's last step is the full DDIM sample
    x99 = ddim_until(family, unet, cond, z, 99, 10, 1.5)
    assert torch.allclose(family.denoise(unet, x99, 99, cond, 1.5).float(), ddim_sample(family, unet, cond, z, 10, 1.5),
                          atol=1e-5)


def test_mnist_student_finishes_from_its_teachers_state():
    student = registry.load("mnist-dmd2-4step-last")
    out = student.generate(LABELS, seed=5, teacher_until=749)
    assert out.nfe == 13 + 3                          # teacher 999..759 (its w = 1: one pass each), student 749..249
    assert out.extra == {"timesteps": [749, 499, 249], "steps": 3, "teacher_until": 749, "teacher_evals": 13,
                         "teacher_grid": 50, "teacher_guidance": 1.0, "teacher_nfe": 13}
    teacher = student.handover_teacher()
    assert teacher.spec.kind == "teacher" and teacher.spec.path.resolve() == (ASSETS / "mnist" / "teacher").resolve()
    z = initial_noise(student.family, len(LABELS), 5)          # by hand: the same noise, the teacher, the student
    x749 = ddim_until(teacher.family, teacher.unet, teacher.family.condition(LABELS), z, 749, 50, 1.0)
    x = student_sample(student.family, student.unet, student.family.condition(LABELS), x749, [749, 499, 249],
                       seed=renoise_seed(5))
    assert np.array_equal(out.images, to_uint8(student.family.decode(x)))
    assert not np.array_equal(out.images, student.generate(LABELS, seed=5).images)
    assert np.array_equal(out.images, student.generate(LABELS, seed=5, teacher_until=749).images)   # deterministic

    late = student.generate(LABELS, seed=5, teacher_until=249, teacher_steps=4)   # teacher 999, 749, 499; student 249
    assert late.nfe == 3 + 1 and late.extra["timesteps"] == [249] and late.extra["teacher_grid"] == 4
    guided = student.generate(LABELS, seed=5, teacher_until=249, teacher_steps=4, teacher_guidance=2.0)
    assert guided.nfe == 3 * 2 + 1 and guided.extra["teacher_guidance"] == 2.0      # CFG: two passes a teacher step
    x249 = ddim_until(teacher.family, teacher.unet, teacher.family.condition(LABELS), z, 249, 4, 2.0)
    x = student_sample(student.family, student.unet, student.family.condition(LABELS), x249, [249], seed=renoise_seed(5))
    assert np.array_equal(guided.images, to_uint8(student.family.decode(x)))


def test_bad_handovers_are_refused_by_name():
    student = registry.load("mnist-dmd2-4step-last")
    for bad in (999, 500, 0):
        with pytest.raises(ValueError, match=rf"later timesteps \(749, 499, 249\), got {bad}"):
            student.generate(LABELS, teacher_until=bad)
    with pytest.raises(ValueError, match="1-step student"):
        registry.load("mnist-dmd2-1step").generate(LABELS, teacher_until=749)
    with pytest.raises(ValueError, match="is a teacher"):
        registry.load("mnist-teacher").generate(LABELS, teacher_until=749)
    with pytest.raises(ValueError, match="teacher_steps must be at least 1"):
        student.generate(LABELS, teacher_until=749, teacher_steps=0)
    with pytest.raises(ValueError, match="step_images"):
        student.generate(LABELS, teacher_until=749, step_images=True)
    with pytest.raises(ValueError, match="teacher_steps: only with teacher_until"):
        student.generate(LABELS, teacher_steps=10)
    with pytest.raises(ValueError, match="teacher_guidance: only with teacher_until"):
        student.generate(LABELS, teacher_guidance=2.0)


def _student_copy(tmp_path, teacher):
    """The committed 2-step student in a folder of its own, its dmd2.json naming `teacher`."""
    folder = tmp_path / "student"
    shutil.copytree(ASSETS / "mnist" / "dmd2-2step", folder)
    meta = json.loads((folder / "dmd2.json").read_text())
    if teacher is None:
        meta.pop("teacher")
    else:
        meta["teacher"] = teacher
    (folder / "dmd2.json").write_text(json.dumps(meta))
    return folder


def test_the_handover_teacher_is_the_one_dmd2_json_names(tmp_path, monkeypatch):
    other = tmp_path / "other-teacher"                  # the MNIST teacher with other weights: other samples
    shutil.copytree(ASSETS / "mnist" / "teacher", other)
    from safetensors.torch import load_file, save_file
    weights = next(other.glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: v * 0.9 if v.ndim > 1 else v for k, v in state.items()}, str(weights))
    ours = registry.load(str(_student_copy(tmp_path / "a", str(ASSETS / "mnist" / "teacher"))))
    theirs = registry.load(str(_student_copy(tmp_path / "b", str(other))))
    assert theirs.handover_teacher().spec.path == other
    a, b = (m.generate(LABELS, seed=1, teacher_until=749).images for m in (ours, theirs))
    assert not np.array_equal(a, b)
    assert np.array_equal(ours.generate(LABELS, seed=1).images, theirs.generate(LABELS, seed=1).images)

    monkeypatch.chdir(tmp_path)                         # a repo-relative teacher path works from any folder
    rel = registry.load(str(_student_copy(tmp_path / "c", "assets/mnist/teacher")))
    assert np.array_equal(rel.generate(LABELS, seed=1, teacher_until=749).images, a)

    with pytest.raises(ModelLoadError, match="names no 'teacher'"):
        registry.load(str(_student_copy(tmp_path / "d", None))).handover_teacher()
    lost = registry.load(str(_student_copy(tmp_path / "e", str(tmp_path / "missing"))))
    with pytest.raises(ModelLoadError, match=r"the teacher its dmd2.json names \('.*missing'\) does not load"):
        lost.handover_teacher()
    shutil.copytree(ASSETS / "mnist" / "teacher", tmp_path / "missing")      # remembered: not retried per call
    with pytest.raises(ModelLoadError, match="does not load"):
        lost.handover_teacher()
    with pytest.raises(ModelLoadError, match="is not a teacher"):          # a student named as the teacher
        registry.load(str(_student_copy(tmp_path / "f", str(ASSETS / "mnist" / "dmd2-1step")))).handover_teacher()
    with pytest.raises(ModelLoadError, match="another noise schedule"):    # the flow teacher for a DDPM student
        registry.load(str(_student_copy(tmp_path / "g", str(ASSETS / "mnist" / "flow-teacher")))).handover_teacher()


def test_flow_student_hands_over_on_the_flow_schedule():
    student = registry.load("mnist-flow-dmd2-4step")
    teacher = student.handover_teacher()
    assert teacher.spec.path.resolve() == (ASSETS / "mnist" / "flow-teacher").resolve()
    out = student.generate(LABELS, seed=2, teacher_until=499, teacher_steps=8)
    grid = teacher.family.schedule.sampling_timesteps(8)
    assert out.extra["teacher_evals"] == len([t for t in grid if t > 499]) == 4
    z = initial_noise(student.family, len(LABELS), 2)
    x = ddim_until(teacher.family, teacher.unet, teacher.family.condition(LABELS), z, 499, 8, teacher.teacher_guidance())
    x = student_sample(student.family, student.unet, student.family.condition(LABELS), x, [499, 249],
                       seed=renoise_seed(2))
    assert np.array_equal(out.images, to_uint8(student.family.decode(x)))


def test_evaluate_records_the_handover(tmp_path, capsys):
    out = tmp_path / "h.json"
    main(["evaluate", "--model", "mnist-dmd2-2step", "--teacher-until", "749", "--teacher-steps", "10",
          "--num", "20", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["teacher_until"] == 749 and result["teacher_grid"] == 10 and result["teacher_guidance"] == 1.0
    assert result["teacher"].endswith("mnist/teacher")
    assert result["nfe"] == 3 + 1                                        # 999, 899, 799, then the student at 749
    main(["sample", "--model", "mnist-dmd2-2step", "--teacher-until", "749", "--num", "4", "--out",
          str(tmp_path / "s.npz")])
    student = registry.load("mnist-dmd2-2step")
    want = student.generate(np.arange(4) % 10, seed=0, teacher_until=749).images
    assert np.array_equal(np.load(tmp_path / "s.npz")["images"], want)
    main(["grid", "--model", "mnist-dmd2-2step", "--teacher-until", "749", "--teacher-steps", "4", "--rows", "1",
          "--out", str(tmp_path / "g.png")])
    assert "NFE 2" in capsys.readouterr().out and (tmp_path / "g.png").is_file()     # teacher at 999, student at 749
    main(["evaluate", "--model", "mnist-dmd2-2step", "--teacher-until", "749", "--teacher-steps", "10",
          "--teacher-guidance", "2", "--num", "20", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["teacher_guidance"] == 2.0 and result["nfe"] == 3 * 2 + 1              # CFG: two passes a step
    main(["sample", "--model", "mnist-dmd2-2step", "--teacher-until", "749", "--teacher-guidance", "2", "--num", "4",
          "--out", str(tmp_path / "s2.npz")])
    want = student.generate(np.arange(4) % 10, seed=0, teacher_until=749, teacher_guidance=2.0).images
    assert np.array_equal(np.load(tmp_path / "s2.npz")["images"], want)
    recorded = json.loads(str(np.load(tmp_path / "s2.npz")["options"]))   # so no reader takes it for plain samples
    assert recorded == {"teacher_until": 749, "teacher_guidance": 2.0}
    main(["sample", "--model", "mnist-dmd2-2step", "--num", "4", "--out", str(tmp_path / "plain.npz")])
    assert json.loads(str(np.load(tmp_path / "plain.npz")["options"])) == {}


@pytest.mark.parametrize("args, message", [
    (["--model", "mnist-dmd2-1step", "--teacher-until", "749"], "1-step student"),
    (["--model", "mnist-teacher", "--teacher-until", "749"], "is a teacher"),
    (["--model", "mnist-dmd2-4step-last", "--teacher-until", "750"], "later timesteps (749, 499, 249), got 750"),
    (["--model", "mnist-dmd2-4step-last", "--teacher-steps", "5"], "only with --teacher-until"),
    (["--model", "mnist-dmd2-4step-last", "--teacher-guidance", "2"], "--teacher-guidance: only with --teacher-until"),
    (["--model", "mnist-dmd2-4step-last", "--teacher-until", "749", "--teacher-guidance", "-1"],
     "--teacher-guidance must be a finite number >= 0, got -1"),
    (["--model", "mnist-dmd2-4step-last", "--teacher-until", "749", "--teacher-guidance", "x"],
     "--teacher-guidance must be a number, got 'x'"),
    (["--model", "mnist-dmd2-4step-last", "--teacher-until", "749", "--per-step"], "--per-step: not with"),
])
def test_evaluate_refuses_bad_handovers(args, message, tmp_path, capsys, monkeypatch):
    import dmd2.__main__ as cli

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(cli, "generate_many", no_sampling)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--num", "20", "--json", str(tmp_path / "x.json"), *args])
    assert e.value.code != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_text_student_hands_over_from_its_base_pipeline(tmp_path):
    sdxl = tiny_sd.make_tiny_sdxl(tmp_path / "tiny-sdxl")
    fam = SDXLFamily.from_pretrained(sdxl)
    torch.manual_seed(1)
    fam.save_student(fam.unet_from_state_dict(tiny_sd.tiny_unet(sdxl=True).state_dict()), tmp_path / "student",
                     timesteps=[999, 499])
    student = registry.load(str(tmp_path / "student"))
    prompts = ["a photo of a cat", "a red dog"]
    out = student.generate(prompts=prompts, seed=3, teacher_until=499, teacher_steps=4)
    assert out.nfe == 2 * 2 + 1                          # teacher at 999 and 749 with CFG 5 (two passes), student at 499
    teacher = student.handover_teacher()
    assert teacher.spec.kind == "teacher" and teacher.family is student.family      # encoders and VAE loaded once
    cond = fam_cond = student.family.condition(prompts)
    x = ddim_until(teacher.family, teacher.unet, fam_cond, initial_noise(student.family, 2, 3), 499, 4, 5.0)
    x = student_sample(student.family, student.unet, cond, x, [499], seed=renoise_seed(3))
    assert np.array_equal(out.images, to_uint8(student.family.decode(x)))
    # another student of the same base shares that teacher (one base UNet in memory, not one per student)
    fam.save_student(fam.unet_from_state_dict(tiny_sd.tiny_unet(sdxl=True).state_dict()), tmp_path / "student2",
                     timesteps=[999, 749, 499])
    assert registry.load(str(tmp_path / "student2")).handover_teacher() is teacher
    # the teacher's part at another CFG scale: w = 1 takes one pass a step
    plain = student.generate(prompts=prompts, seed=3, teacher_until=499, teacher_steps=4, teacher_guidance=1.0)
    assert plain.nfe == 2 + 1 and plain.extra["teacher_guidance"] == 1.0
    assert not np.array_equal(plain.images, out.images)


def test_handover_table_gap_and_wins(tmp_path, capsys):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import handover_table

    assert handover_table.gap_closed(0.86, 0.84, 0.88) == pytest.approx(0.5)
    assert handover_table.gap_closed(0.83, 0.84, 0.88) == pytest.approx(-0.25)     # lost more than it won back
    with pytest.raises(ValueError, match="no gap"):
        handover_table.gap_closed(0.9, 0.8, 0.8)
    base = {"fid": 5.0, "classifier_recall": 0.84, "autoencoder_recall": 0.80, "classifier_precision": 0.85}
    files = {}
    for name, change in (("h0", {"fid": 4.0, "classifier_recall": 0.87}), ("h1", {"fid": 6.0, "classifier_recall": 0.85}),
                         ("s", {}), ("t", {"fid": 8.0, "classifier_recall": 0.88, "autoencoder_recall": 0.86,
                                           "classifier_precision": 0.78})):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({**base, **change}))
    handover_table.main(["--hybrid", f"{files['h0']},{files['h1']}", "--student", str(files["s"]),
                         "--teacher", str(files["t"])])
    out = capsys.readouterr().out
    assert "| FID (classifier; selection) | 5.00 | 5.00 | 8.00 |" in out      # the mean of 4 and 6
    assert "g (classifier recall) = 0.50" in out and "g (autoencoder recall) = 0.00" in out
    assert "beats the student on 1 of 4 measures; not on: FID" in out       # only the classifier recall
    assert "beats the teacher on 2 of 4 measures" in out                   # FID and precision


def test_text_evaluation_passes_the_handover_to_every_batch():
    from types import SimpleNamespace

    from dmd2.metrics.text_to_image import evaluate_text_model

    seen = []

    class Model:
        def generate(self, prompts, seed, steps, guidance, autocast, **handover):
            seen.append(handover)
            return SimpleNamespace(images=np.zeros((len(prompts), 4, 4, 3), np.uint8), seconds=0.1, nfe=5)

    class Metrics:
        def add(self, images, prompts):
            pass

        def result(self, reference):
            return {}

    result = evaluate_text_model(Model(), ["a", "b", "c"], Metrics(), batch_size=2,
                                 handover={"teacher_until": 499, "teacher_steps": 4})
    assert seen == [{"teacher_until": 499, "teacher_steps": 4}] * 2 and result["nfe"] == 5
