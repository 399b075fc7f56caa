"""Run folders (training.runs): states, students, listing; what the registry, push and the app read."""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_run
from training.runs import Run, finished_students, list_runs


def test_finished_students_lists_finished_runs_only(tmp_path):
    assert finished_students(tmp_path / "missing") == []
    write_run(tmp_path, "b-done", "finished")
    write_run(tmp_path, "a-done", "finished")
    write_run(tmp_path, "running", "running")
    write_run(tmp_path, "no-student", "finished", student=False)
    (tmp_path / "not-a-run").mkdir()
    assert finished_students(tmp_path) == [str(tmp_path / n / "student") for n in ("a-done", "b-done")]


def test_a_lora_student_counts_as_a_student(tmp_path):
    """A LoRA student folder has dmd2.json and the LoRA file it names, no config.json."""
    run = Run(write_run(tmp_path, "lora", "finished", student=False))
    run.student.mkdir()
    (run.student / "dmd2.json").write_text(json.dumps({"family": "sdxl", "lora": "pytorch_lora_weights.safetensors",
                                                       "timesteps": [999]}))
    assert not run.has_student()                                   # the named file is not there yet
    (run.student / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    assert run.has_student() and run.is_finished()
    assert finished_students(tmp_path) == [str(run.student)]
    (run.student / "dmd2.json").write_text(json.dumps({"family": "sdxl", "timesteps": [999]}))
    assert run.has_student()                                       # no "lora" key: the folder's only .safetensors
    (run.student / "other.safetensors").write_bytes(b"weights")
    assert not run.has_student()                                   # two of them: which one is ambiguous


DAMAGES = {  # what a damaged status.json holds -> what the reason says
    "[1, 2]": "holds a JSON list, not an object",
    '"finished"': "holds a JSON str, not an object",
    "{not json": "is not valid JSON",
    b"\xff\xfe": "is not UTF-8 text",
    "dir": "is a folder, not a file",
    '{"state": "finished", "updated": "yesterday"}': "'updated' is 'yesterday', not a float",
    '{"state": "running", "step": "12"}': "'step' is '12', not a int",
    '{"state": "done"}': "state 'done' is not one of",
}


def damage_status(run: Run, damage) -> None:
    run.status_path.unlink(missing_ok=True)
    if damage == "dir":
        run.status_path.mkdir()
    elif isinstance(damage, bytes):
        run.status_path.write_bytes(damage)
    else:
        run.status_path.write_text(damage)


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_status_is_a_damaged_run_with_its_reason(tmp_path, damage):
    run = Run(write_run(tmp_path, "r", "finished"))
    damage_status(run, damage)
    assert run.status() == {} and run.state() == "damaged" and DAMAGES[damage] in run.damage()
    assert not run.is_finished() and finished_students(tmp_path) == []
    assert [r.name for r in list_runs(tmp_path)] == ["r"]         # still listed, as damaged


def test_a_sound_or_missing_status_has_no_damage(tmp_path):
    run = Run(write_run(tmp_path, "r", "finished"))
    assert run.damage() is None and run.state() == "finished"
    run.status_path.unlink()
    assert run.damage() is None and run.state() is None


def test_metrics_lines_that_are_not_records_are_skipped(tmp_path):
    run = Run(tmp_path / "r").create()
    run.metrics_path.write_text('{"step": 1, "loss": 0.5}\n[1, 2]\n"text"\n{"step": "x"}\n{"step": 2}\n{half')
    assert [r["step"] for r in run.metrics()] == [1, 2]


def test_status_states_are_checked_and_fields_merge(tmp_path):
    run = Run(tmp_path / "r").create()
    run.set_status("running", step=3, pid=42)
    run.set_status("finished", step=5)
    status = run.status()
    assert (status["state"], status["step"], status["pid"]) == ("finished", 5, 42) and status["updated"] > 0
    with pytest.raises(ValueError, match="'done' is not one of running, finished, stopped, failed"):
        run.set_status("done")


def test_list_runs_is_every_folder_with_a_config_a_status_or_a_log_newest_first(tmp_path):
    for i, name in enumerate(("with-config", "with-status", "with-log")):
        (tmp_path / name).mkdir()
        marker = {"with-config": "config.yaml", "with-status": "status.json", "with-log": "train.log"}[name]
        (tmp_path / name / marker).write_text("{}")
        os.utime(tmp_path / name / marker, (1000 + i, 1000 + i))
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    assert [r.name for r in list_runs(tmp_path)] == ["with-log", "with-status", "with-config"]
    assert list_runs(tmp_path / "missing") == []


def test_iterations_and_log_tail_tolerate_old_and_broken_files(tmp_path):
    run = Run(tmp_path / "r").create()
    assert run.iterations() == 0 and run.log_tail() == ""
    run.config_path.write_text("steps: 40\n")                     # a config from before the rename
    assert run.iterations() == 40
    run.config_path.write_text("iterations: 50\n")
    assert run.iterations() == 50
    run.config_path.write_bytes(b"\xff: [")
    assert run.iterations() == 0
    run.log_path.write_text("loading\nerror: teacher folder not found\nTraceback\n")
    assert run.log_tail() == "error: teacher folder not found"


def test_checkpoints_and_kept_configs_are_found_by_their_names_only(tmp_path):
    run = Run(tmp_path / "r").create()
    for name in ("step-00000002", "step-00000010", "step-foo", ".tmp-step-00000012"):
        (run.checkpoints / name).mkdir()
        (run.checkpoints / name / "state.pt").write_bytes(b"x")
    (run.checkpoints / "step-00000011").mkdir()                         # no state.pt: incomplete
    assert list(run.checkpoint_steps()) == [2, 10]
    run.config_path.write_text("iterations: 10\n")
    assert run.keep_config_before(5).name == "config.before-step-5.yaml" and not run.config_path.exists()
    run.config_path.write_text("iterations: 20\n")
    (run.path / "config.before-step-x.yaml").write_text("")           # a stray name is not a kept config
    assert run.config_in_force(3).name == "config.before-step-5.yaml"
    assert run.config_in_force(6) == run.config_path
    assert run.sample_path(7).name == "step-00000007.png"
