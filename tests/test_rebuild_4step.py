"""The embedded 4-step student's recipe: stage presets that match the recorded runs, and
scripts/rebuild_4step.py, which chains them by generator_init and exports each stage like the card says."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from dmd2 import registry
from training.config import load_config, read_config_file

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "assets/mnist/dmd2-4step"
PRESETS = [ROOT / "configs/mnist-4step-stage1.yaml"] + [ROOT / f"configs/mnist-4step-stage{n}.yaml" for n in (2, 3, 4)]
RECORDED = [ASSET / f"distill_config.stage{n}.yaml" for n in (1, 2, 3)] + [ASSET / "distill_config.yaml"]
# What each stage changes from the one before, as the card's commands name it (--set ...).
CARD_CHANGES = [
    {"generator_init", "gan_max_t", "gan_generator_weight", "iterations", "eval_every", "keep_checkpoints"},
    {"generator_init", "checkpoint_every", "keep_checkpoints"},
    {"generator_init", "step_weights"},
]
# Where each preset starts: the previous stage's output as scripts/rebuild_4step.py lays it out.
STARTS = ["assets/mnist/dmd2-1step", "runs/rebuild-4step/stage1/student", "runs/rebuild-4step/stage2-export",
          "runs/rebuild-4step/stage3-export"]


def _settings(path: Path) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the recorded configs spell `iterations` as `steps`
        return load_config(path).to_dict()


def test_stage_presets_are_the_recorded_runs_settings_chained_by_generator_init():
    presets = [_settings(p) for p in PRESETS]
    for preset, recorded, start, path in zip(presets, RECORDED, STARTS, PRESETS):
        differ = {k for k in preset if preset[k] != _settings(recorded)[k]}
        assert differ <= {"generator_init", "mixed_precision"}, f"{path.name} differs from {recorded.name} in {sorted(differ)}"
        # the runs were made in bf16 on a CPU with bf16 units, which is what the presets' "auto" takes there
        assert (preset["mixed_precision"], _settings(recorded)["mixed_precision"]) == ("auto", "bf16")
        assert preset["generator_init"] == start
    for before, after, named in zip(presets, presets[1:], CARD_CHANGES):
        assert {k for k in after if after[k] != before[k]} == named
    for preset in presets[2:]:  # stopped after step 500 of a 1,500-step schedule, which sets their LR
        assert preset["iterations"] == 1500 and preset["checkpoint_every"] == 125
    for path in PRESETS[1:]:  # the new key name, set in the file or in one of its bases
        assert "iterations" in read_config_file(path)
        chain = path
        while chain is not None:
            own = yaml.safe_load(chain.read_text())
            assert "steps" not in own, chain
            chain = chain.parent / own["base"] if "base" in own else None


TINY = "iterations=4 batch_size=2 ttur=2 warmup_steps=0 eval_every=0 sample_every=0 log_every=1 checkpoint_every=2"
STOP = 2  # stages 3 and 4 stop here, as the real ones stop at 500 of 1,500


def _rebuild(out: Path) -> subprocess.CompletedProcess:
    sets = [a for kv in TINY.split() for a in ("--set", kv)]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/rebuild_4step.py"), "--out", str(out), *sets,
                           "--stop-after", str(STOP)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    out = tmp_path_factory.mktemp("rebuild") / "out"
    return out, _rebuild(out)


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.slow
def test_rebuild_chains_each_stage_from_the_previous_output(rebuilt):
    out, proc = rebuilt
    inits = [_config(out / f"stage{n}")["generator_init"] for n in (1, 2, 3, 4)]
    assert inits == ["assets/mnist/dmd2-1step", str(out / "stage1/student"), str(out / "stage2-export"),
                     str(out / "stage3-export")]
    tiny = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in TINY.split())}
    for n, preset in zip((1, 2, 3, 4), PRESETS):  # each run is its preset with only the tiny budget changed
        cfg, want = _config(out / f"stage{n}"), _settings(preset)
        assert {k: cfg[k] for k in want if k != "generator_init"} == {
            k: tiny.get(k, v) for k, v in want.items() if k != "generator_init"}
    assert _config(out / "stage4")["step_weights"] == [0, 1, 1, 0]
    # Stage 2 runs to its end and is exported with its start and every kept checkpoint; stages 3 and 4 leave
    # the loop at STOP, before their scheduled end, and are exported up to there.
    assert "--step 0 2 4 --out" in proc.stdout and proc.stdout.count(f"--step 0 {STOP} --out") == 2
    for n in (3, 4):
        run = out / f"stage{n}"
        assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [f"step-{STOP:08d}"]
        assert '"state": "stopped"' in (run / "status.json").read_text()
        assert not (run / "student").exists()
    card = (out / "stage4-export/MODEL_CARD.md").read_text()
    assert f"steps 0, {STOP} of the run" in card and str(out / "stage3-export") in card


@pytest.mark.slow
def test_rebuilt_student_loads_and_samples(rebuilt):
    out, _ = rebuilt
    student = registry.load(str(out / "stage4-export"))
    try:
        images = student.generate(np.arange(4), seed=0)
        assert student.timesteps == (999, 749, 499, 249) and images.nfe == 4
        assert images.images.shape == (4, 32, 32, 1) and images.images.std() > 0
    finally:
        registry.forget(str(out / "stage4-export"))


@pytest.mark.slow
def test_rerun_skips_every_finished_step(rebuilt):
    out, _ = rebuilt
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = _rebuild(out)
    assert "+ " not in proc.stdout, proc.stdout  # no command ran
    assert proc.stdout.count("skip:") == 4  # stage 1, export 2 (with stage 2), exports 3 and 4 (with their runs)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
