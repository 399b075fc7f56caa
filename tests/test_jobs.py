"""The training-job supervisor's pure parts: `--set` values, ETA, presets, run names, launch checks.

Launching, stopping and resuming real trainers is tested through the app in test_train_ui.py.
"""

from __future__ import annotations

import re

import pytest

from training.config import ConfigError, list_presets, load_config, overrides_from
from training.jobs import JobError, Jobs, eta_seconds


def test_overrides_are_written_so_the_trainer_reads_them_back():
    settings = dict(iterations=4.0, batch_size=8, generator_lr=2e-4, critic_lr=1e-05, backward_simulation=False,
                    gan_critic_weight=None, teacher="/tmp/a b/teacher")
    assert overrides_from(settings, "# a comment\n\n sample_every=2 \neval_every=0") == [
        "iterations=4", "batch_size=8", "generator_lr=0.0002", "critic_lr=1e-05", "backward_simulation=false",
        'teacher="/tmp/a b/teacher"', "sample_every=2", "eval_every=0"]
    cfg = load_config(None, overrides_from(settings))
    assert (cfg.iterations, cfg.batch_size, cfg.generator_lr, cfg.critic_lr, cfg.backward_simulation, cfg.teacher) == \
        (4, 8, 2e-4, 1e-5, False, "/tmp/a b/teacher")
    with pytest.raises(ConfigError, match="'steps 4' must look like key=value"):
        overrides_from({}, "steps 4")


def test_eta_uses_the_pace_since_the_last_restart():
    def rec(step, seconds):
        return {"step": step, "seconds": seconds, "images_per_s": 1.0}
    assert eta_seconds([], 0, 10) is None
    assert eta_seconds([rec(2, 4.0)], 2, 10) == pytest.approx(16.0)           # one record from step 0
    assert eta_seconds([rec(2, 4.0), rec(4, 6.0)], 4, 10) == pytest.approx(6.0)
    evaluation = {"step": 4, "seconds": 60.0, "eval/fid": 9.0}                 # not a pace sample
    resumed = [rec(2, 4.0), rec(4, 6.0), evaluation, rec(5, 3.0), rec(7, 13.0)]
    assert eta_seconds(resumed, 7, 10) == pytest.approx(15.0)                  # 5 s/step since the resume
    assert eta_seconds(resumed[:4], 5, 10) is None                             # one record after a resume
    assert eta_seconds([rec(10, 20.0)], 10, 10) == 0.0


def test_gpu_presets_are_listed_only_with_cuda(tmp_path):
    (tmp_path / "mnist-1step.yaml").write_text("student_steps: 1\n")
    (tmp_path / "sdxl-4step.yaml").write_text("family: sdxl\n")
    (tmp_path / "sd15-lora.yaml").write_text("family: sd15\n")
    assert list_presets(tmp_path, cuda=False) == ["mnist-1step"]
    assert list_presets(tmp_path, cuda=True) == ["mnist-1step", "sd15-lora", "sdxl-4step"]
    assert "mnist-1step" in list_presets() and "mnist-4step" in list_presets()     # the shipped presets


@pytest.mark.parametrize("name, message", [
    ("../evil", "bad run name"), ("a/b", "bad run name"), ("", "enter a run name"), ("..", "bad run name"),
    ("x" * 65, "bad run name"),
])
def test_run_names_cannot_leave_the_runs_folder(tmp_path, name, message):
    with pytest.raises(JobError, match=message):
        Jobs(tmp_path / "runs").run_dir(name)


def test_bad_knob_values_fail_with_the_trainers_message(tmp_path):
    m = Jobs(tmp_path)
    with pytest.raises(JobError, match=r"bad setting: config batch_size=0: must be an integer >= 1"):
        m.check("mnist-1step", {"batch_size": 0})
    with pytest.raises(JobError, match=r"config iterations=2.5: must be an integer"):
        m.check("mnist-1step", {"iterations": 2.5})
    with pytest.raises(JobError, match="unknown config key 'stepz'"):
        m.check("mnist-1step", {}, "stepz=3")
    with pytest.raises(JobError, match="teacher folder '.*/nowhere' has no config.json"):
        m.check("mnist-1step", {"teacher": str(tmp_path / "nowhere")})     # inside the allowed folders
    with pytest.raises(JobError, match="unknown preset 'sdxl-nope'"):
        m.check("sdxl-nope")
    cfg, overrides = m.check("mnist-4step", {"iterations": 3})
    assert cfg.iterations == 3 and cfg.student_steps == 4 and overrides == ["iterations=3"]


@pytest.mark.parametrize("settings, message", [
    ({"iterations": 1_000_000_000}, "iterations=1000000000 is outside the app's bounds 1..1e+06"),
    ({"batch_size": 100_000}, "batch_size=100000 is outside the app's bounds 1..1024"),
    ({"generator_lr": 1e308}, "generator_lr=1e+308 is outside the app's bounds"),
    ({"data": "/etc"}, "data='/etc' points outside the folders the app may read or write"),
    ({"generator_init": "/root/elsewhere"}, "generator_init='/root/elsewhere' points outside"),
    ({"latent_cache_dir": "/var/tmp/x"}, "latent_cache_dir='/var/tmp/x' points outside"),
    ({"regression_weight": 0.5, "regression_pairs": "/var/tmp/p.npz"}, "regression_pairs='/var/tmp/p.npz' points outside"),
    ({"regression_weight": 50.0, "regression_pairs": "runs/p.npz"}, "regression_weight=50.0 is outside the app's bounds"),
    ({"generator_init": "../outside-the-project"}, "generator_init='../outside-the-project' points outside"),
    ({"family": "sdxl", "data": "hf:some/data", "eval_every": 0}, "family='sdxl': this app trains only pixel"),
])
def test_launch_settings_outside_the_apps_bounds_are_refused_naming_the_key(tmp_path, settings, message):
    jobs = Jobs(tmp_path / "runs", cuda=False)
    with pytest.raises(JobError, match=re.escape(message)):
        jobs.check("mnist-1step", settings)


def test_launch_settings_inside_the_bounds_pass(tmp_path, monkeypatch):
    jobs = Jobs(tmp_path / "runs", cuda=False)
    cfg, _ = jobs.check("mnist-4step", {"iterations": 10, "generator_init": "assets/mnist/dmd2-1step"})
    assert cfg.generator_init == "assets/mnist/dmd2-1step"
    student = tmp_path / "runs" / "a" / "student"
    student.mkdir(parents=True)
    (student / "config.json").write_text("{}")
    jobs.check("mnist-1step", {"generator_init": str(student)})                                 # the runs folder
    monkeypatch.setenv("DMD2_DATA_ROOTS", str(tmp_path / "mine"))
    jobs.check("mnist-1step", {"data": str(tmp_path / "mine" / "digits")})                      # a listed folder
    monkeypatch.setenv("DMD2_DATA_ROOTS", "")
    with pytest.raises(JobError, match="data=.* points outside"):
        jobs.check("mnist-1step", {"data": str(tmp_path / "mine" / "digits")})


@pytest.mark.parametrize("name, settings, extra, message", [
    (5, None, "", "the run name must be text, got int 5"),
    ("x", ["iterations", 4], "", "config values must be a mapping of key to value, got list"),
    ("x", None, ["iterations=4"], "other config values must be text"),
    ("x", {"betas": ["a", "b"]}, "", "config betas=['a', 'b']: must be a list of two numbers"),
    ("x", {"betas": "fast"}, "", "config betas='fast': must be a list of two numbers"),
    ("x", {3: 4}, "", "config keys must be text"),
])
def test_bad_launch_inputs_get_a_message(tmp_path, name, settings, extra, message):
    jobs = Jobs(tmp_path / "runs", cuda=False)
    with pytest.raises(JobError, match=re.escape(message)):
        jobs.run_dir(name)
        jobs.check("mnist-1step", settings, extra)


def test_a_stage_preset_without_its_start_is_refused_before_launch(tmp_path):
    jobs = Jobs(tmp_path / "runs", cuda=False)
    assert "mnist-4step-stage2" in jobs.presets()
    with pytest.raises(JobError, match="generator_init 'runs/rebuild-4step/stage1/student' is not a student folder yet"):
        jobs.check("mnist-4step-stage2")


def test_the_default_preset_comes_first_whatever_the_names(tmp_path):
    for name in ("a-first", "mnist-1step", "mnist-1step-guided", "mnist-4step"):
        (tmp_path / f"{name}.yaml").write_text("student_steps: 1\n")
    assert list_presets(tmp_path, cuda=False) == ["mnist-1step", "a-first", "mnist-1step-guided", "mnist-4step"]
    assert list_presets()[0] == "mnist-1step"      # the Train tab's default: the teacher-to-student preset
