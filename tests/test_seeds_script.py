"""scripts/seeds.py: a preset trained for several seeds, each scored on sample sets, tabled with its spread."""

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import tiny_pixel_unet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import seeds  # noqa: E402


def tiny_preset(tmp_path) -> Path:
    """A 2-iteration preset on a tiny random teacher (saved under tmp_path)."""
    tiny_pixel_unet().save_pretrained(tmp_path / "teacher", safe_serialization=True)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(f"teacher: {tmp_path / 'teacher'}\ndata: mnist5k\niterations: 2\nttur: 2\nbatch_size: 4\n"
                      "warmup_steps: 1\nmixed_precision: 'no'\nsample_every: 0\neval_every: 0\ncheckpoint_every: 0\n")
    return preset


def test_beats_knows_each_measures_direction():
    assert seeds.beats(5.0, 6.0, "lower") and not seeds.beats(6.0, 5.0, "lower")
    assert seeds.beats(0.9, 0.8, "higher") and not seeds.beats(0.8, 0.8, "higher")
    assert seeds.beats(1.02, 0.95, "one") and not seeds.beats(1.2, 0.9, "one")


def test_a_seeds_value_is_the_mean_over_its_sample_sets():
    assert seeds.mean_over([{"fid": 7.0, "alignment": 0.9}, {"fid": 8.0}]) == {"fid": 7.5, "alignment": 0.9}


def test_table_gives_mean_spread_and_which_measures_every_seed_wins():
    per_seed = {0: {"fid": 7.0, "alignment": 0.97, "autoencoder_fid": 20.0},
                1: {"fid": 9.0, "alignment": 0.99, "autoencoder_fid": 16.0}}
    text = seeds.table("p", per_seed, {"teacher": {"fid": 8.0, "alignment": 0.96, "autoencoder_fid": 17.0}})
    fid_row = next(line for line in text.splitlines() if line.startswith("| FID (classifier"))
    assert "| 7.00 | 9.00 | 8.00 +- 1.41 (7.00-9.00) | 8.00 |" in fid_row
    # seed 1 loses the classifier FID and seed 0 the autoencoder FID: only alignment is won by every seed
    assert "Every seed beats teacher on 1 of 3 measures; not on: FID (classifier; selection), FID (autoencoder)." in text


def test_trains_each_seed_scores_each_sample_set_and_skips_what_exists(tmp_path, capsys):
    preset = tiny_preset(tmp_path)
    teacher_json = tmp_path / "teacher.json"
    teacher_json.write_text(json.dumps({"fid": 1e9, "alignment": 0.0, "autoencoder_fid": 0.0}))
    argv = ["--preset", str(preset), "--seeds", "0", "1", "--sample-sets", "3", "--num", "20",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
            "--reference", f"teacher={teacher_json}"]
    seeds.main(argv)
    out = capsys.readouterr().out
    assert out.count("-m training distill") == 2 and out.count("-m dmd2 evaluate") == 2
    for seed in (0, 1):
        config = (tmp_path / "runs" / f"tiny-seed{seed}" / "config.yaml").read_text()
        assert f"seed: {seed}" in config
        for k in (3,):
            result = json.loads((tmp_path / "results" / f"tiny-seed{seed}-set{k}.json").read_text())
            assert result["seed"] == 1000 * k and result["num"] == 20 and "autoencoder_fid" in result
    assert "Every seed beats teacher on 2 of 3 measures; not on: FID (autoencoder)." in out
    written = (tmp_path / "results" / "tiny-table.md").read_text()
    assert written.startswith("| measure | seed 0 | seed 1 |") and written.strip() in out
    seeds.main(argv)                       # everything exists: nothing runs again, the table is the same
    again = capsys.readouterr().out
    assert "$ " not in again and again.strip().splitlines()[-3] == out.strip().splitlines()[-3]
    assert (tmp_path / "results" / "tiny-table.md").read_text() == written


def test_a_result_older_than_its_student_or_from_before_a_training_is_scored_again(tmp_path, capsys):
    """README's command re-run on a clone: the committed JSONs must not be tabled beside the students trained here."""
    import time
    preset, runs, results = tmp_path / "p.yaml", tmp_path / "runs", tmp_path / "results"
    preset.write_text("iterations: 2\n")
    results.mkdir()
    for seed in (0, 1):                                   # seeds 0 and 1 finished here; seed 2 was never run here
        (runs / f"p-seed{seed}" / "student").mkdir(parents=True)
        (runs / f"p-seed{seed}" / "status.json").write_text(json.dumps({"state": "finished"}))
        (runs / f"p-seed{seed}" / "student" / "model.safetensors").write_text("weights")
    for seed in (0, 1, 2):
        (results / f"p-seed{seed}-set0.json").write_text(json.dumps({"fid": 5.0 + seed}))
    os.utime(results / "p-seed0-set0.json", (1e9, 1e9))  # seed 0's result predates its student; seed 1's does not
    os.utime(results / "p-seed1-set0.json", (time.time() + 60,) * 2)
    argv = ["--preset", str(preset), "--seeds", "0", "1", "2", "--sample-sets", "0", "--runs", str(runs),
            "--results", str(results)]
    for extra in ([], ["--parallel", "2"]):
        seeds.main(argv + extra + ["--dry-run"])
        out = capsys.readouterr().out
        scored = [line for line in out.splitlines() if "-m dmd2 evaluate" in line]
        assert len(scored) == 2 and "p-seed0/student" in scored[0] and "p-seed2/student" in scored[1], out
        assert "p-seed0-set0.json is older than" in out and "p-seed1-set0.json is older" not in out
        assert out.count("-m training distill") == 1 and "p-seed2 " in out    # seed 2 trains, then is scored anew
    seeds.main(argv + ["--table-only"])      # runs nothing, and tables seed 0's stale result nowhere
    out = capsys.readouterr().out
    assert "$ " not in out and "left out of the table" in out
    assert out.splitlines()[2] == "| measure | seed 1 | seed 2 | p: mean +- sd (min-max) |"
    assert "| 6.00 | 7.00 |" in out and (results / "p-table.md").read_text().startswith("| measure | seed 1 | seed 2 |")


def test_bad_arguments_are_named(tmp_path, capsys):
    for argv, message in ((["--preset", str(tmp_path / "none.yaml")], "no such file"),
                          (["--preset", __file__, "--seeds", "1", "1"], "repeats a seed"),
                          (["--preset", __file__, "--reference", "teacher"], "NAME=JSON"),
                          (["--preset", __file__, "--parallel", "0"], "--parallel must be at least 1"),
                          (["--preset", __file__, "--score-parallel", "2"], "comes with --parallel N > 1"),
                          (["--preset", __file__, "--parallel", "2", "--score-parallel", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            seeds.main(argv)
        assert message in capsys.readouterr().err


def test_training_minutes_adds_the_stretches_of_a_resumed_run(tmp_path):
    records = [{"step": 10, "seconds": 60.0}, {"step": 20, "seconds": 120.0},      # first stretch: 2 min
               {"step": 30, "seconds": 30.0}, {"step": 40, "seconds": 90.0}]       # resumed: 1.5 min more
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert seeds.training_minutes(tmp_path) == pytest.approx(3.5)
    (tmp_path / "metrics.jsonl").write_text("")
    assert seeds.training_minutes(tmp_path) is None


def test_table_gives_each_seeds_wall_time_only_when_every_seed_has_one():
    per_seed = {0: {"fid": 7.0}, 1: {"fid": 9.0}}
    text = seeds.table("p", per_seed, {"teacher": {"fid": 8.0}}, {0: 40.0, 1: 50.0})
    assert "| training wall time, min | 40.0 | 50.0 | 45.0 +- 7.1 (40.0-50.0) | - |" in text
    assert "wall time" not in seeds.table("p", per_seed, {}, {0: 40.0, 1: None})


def test_parallel_trains_the_seeds_side_by_side_then_scores_each(tmp_path, capsys):
    preset = tiny_preset(tmp_path)
    argv = ["--preset", str(preset), "--seeds", "0", "1", "--sample-sets", "0", "--num", "20", "--parallel", "2",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    seeds.main(argv + ["--dry-run"])                      # a dry run lists each training once and runs nothing
    dry = capsys.readouterr().out
    assert dry.count("-m training distill") == 2 and dry.count("-m dmd2 evaluate") == 2
    assert not (tmp_path / "runs").exists()
    seeds.main(argv)
    out = capsys.readouterr().out
    lines = out.splitlines()
    trains = [i for i, line in enumerate(lines) if "-m training distill" in line]
    evals = [i for i, line in enumerate(lines) if "-m dmd2 evaluate" in line]
    assert len(trains) == 2 and len(evals) == 2 and max(trains) < min(evals)   # both trained before any scoring
    for seed in (0, 1):
        run = tmp_path / "runs" / f"tiny-seed{seed}"
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert f"seed: {seed}" in (run / "config.yaml").read_text()
        assert (tmp_path / "runs" / f"tiny-seed{seed}.log").is_file()            # its output, not interleaved
        assert (tmp_path / "runs" / f"tiny-seed{seed}-set0.log").is_file()       # the scoring's, likewise
        assert json.loads((tmp_path / "results" / f"tiny-seed{seed}-set0.json").read_text())["num"] == 20
    assert "Every seed" not in out and "| FID (classifier; selection) |" in out


def test_parallel_scoring_runs_m_at_once_and_names_each_sample_set_that_failed(tmp_path, capsys, monkeypatch):
    preset = tiny_preset(tmp_path)
    argv = ["--preset", str(preset), "--seeds", "1", "0", "--sample-sets", "0", "1", "2", "--num", "20",
            "--parallel", "3", "--score-parallel", "2", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results")]
    seeds.main(argv + ["--sample-sets", "0"])                       # both seeds trained and scored on set 0
    capsys.readouterr()
    broken = tmp_path / "runs" / "tiny-seed1" / "student" / "config.json"
    broken.write_text("{broken")
    os.utime(broken, (1e9, 1e9))     # damaged in place, not retrained: set 0's result stays newer than the student
    started, live = [], []

    class Counted(seeds.subprocess.Popen):                           # how many scorings run when each starts
        def __init__(self, *args, **kwargs):
            live[:] = [p for p in live if p.poll() is None]
            super().__init__(*args, **kwargs)
            live.append(self)
            started.append(len(live))

    monkeypatch.setattr(seeds.subprocess, "Popen", Counted)
    with pytest.raises(SystemExit, match=r"scoring failed for seed 1 sample set 1 \(exit [1-9].*"
                                         r"seed 1 sample set 2 \(exit [1-9]"):
        seeds.main(argv)            # seed 1's sets 1 and 2 start first and fail; seed 0's still run after them
    out = capsys.readouterr().out
    assert out.count("-m dmd2 evaluate") == 4 and "-m training distill" not in out   # only what was missing
    assert started[:2] == [1, 2] and max(started) == 2                               # two at a time, never three
    assert all((tmp_path / "results" / f"tiny-seed0-set{k}.json").is_file() for k in (1, 2))
    assert not (tmp_path / "results" / "tiny-seed1-set1.json").exists()
    assert "could not load" in (tmp_path / "runs" / "tiny-seed1-set1.log").read_text()  # evaluate's own message


def test_parallel_names_the_seed_that_failed_and_keeps_the_others(tmp_path, capsys):
    preset = tiny_preset(tmp_path)
    bad = tmp_path / "runs" / "tiny-seed1"
    bad.mkdir(parents=True)
    (bad / "status.json").write_text('{"state": "stopped"}')  # a stopped run without its config: resume fails
    argv = ["--preset", str(preset), "--seeds", "0", "1", "--sample-sets", "0", "--num", "20", "--parallel", "2",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    with pytest.raises(SystemExit, match=r"training failed for seed 1 \(exit [1-9]"):
        seeds.main(argv)
    assert json.loads((tmp_path / "runs" / "tiny-seed0" / "status.json").read_text())["state"] == "finished"
    assert "config" in (tmp_path / "runs" / "tiny-seed1.log").read_text()          # the trainer's own message
    (bad / "status.json").write_text("{not json")         # a status that cannot be read is named, not a traceback
    with pytest.raises(SystemExit, match="tiny-seed1/status.json cannot be read"):
        seeds.main(argv)


def test_a_table_says_which_seeds_second_sample_set_overlaps_its_first(tmp_path, capsys):
    """Results scored at --seed 1 (before sample sets were 1000 seeds apart) are tabled with a note saying so."""
    preset, runs, results = tmp_path / "p.yaml", tmp_path / "runs", tmp_path / "results"
    preset.write_text("iterations: 2\n")
    results.mkdir()
    for seed, second in ((0, 1), (1, 1000)):           # seed 0: the old convention; seed 1: the new one
        for k, sampled in ((0, 0), (1, second)):
            (results / f"p-seed{seed}-set{k}.json").write_text(json.dumps({"fid": 5.0 + k, "seed": sampled}))
    seeds.main(["--preset", str(preset), "--seeds", "0", "1", "--runs", str(runs), "--results", str(results),
                "--table-only"])
    out = capsys.readouterr().out
    assert "Seeds 0: a sample set after the first was scored at --seed k" in out
