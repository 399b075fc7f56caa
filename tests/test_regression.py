"""DMD's regression term (off in DMD2, `regression_weight` here): teacher pairs (`python -m training pairs`),
their file's checks, the config's rules, and what the term does to a tiny 1-step student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_distill_config
from dmd2.families.pixel import PixelFamily
from dmd2.sampling import ddim_sample
from training.config import ConfigError
from training.distill import distill
from training.pairs import PairsError, load_pairs, make_pairs, save_pairs, teacher_fingerprint
from training.runs import RunError
from training.trainer import DMD2Trainer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pairs_file(setup, family, tmp_path):
    """12 pairs of the tiny teacher at CFG 2 (tiny_distill_config's real_guidance), 3 DDIM steps."""
    return write_pairs(family, family.load_teacher(setup[0]), tmp_path / "pairs.npz", num=12)


def write_pairs(family, teacher, path, num=12, seed=7, guidance=2.0):
    save_pairs(path, make_pairs(family, teacher, num, seed=seed, steps=3, guidance=guidance, batch_size=5),
               dict(guidance=guidance, steps=3, teacher_fingerprint=teacher_fingerprint(teacher)))
    return path


def config(setup, pairs, **overrides):
    base = dict(regression_weight=1.0, regression_pairs=str(pairs), ttur=1, gan_generator_weight=0.0,
                gan_critic_weight=0.0)
    return tiny_distill_config(setup, **dict(base, **overrides))


def test_pairs_are_the_teachers_ddim_samples_from_seeded_noise(family, unet):
    pairs = make_pairs(family, unet, 5, seed=3, steps=4, guidance=1.5, batch_size=2)
    assert pairs["labels"].tolist() == [0, 1, 2, 0, 1]
    first, third = (torch.randn(family.latent_shape(n), generator=torch.Generator().manual_seed(3 + b))
                    for b, n in ((0, 2), (2, 1)))
    assert np.array_equal(pairs["noise"][:2], first.numpy()) and np.array_equal(pairs["noise"][4:], third.numpy())
    expected = ddim_sample(family, unet, torch.tensor([0, 1]), first, steps=4, guidance=1.5)
    assert np.allclose(pairs["target"][:2], expected.numpy(), atol=1e-6)
    assert not np.allclose(pairs["target"], pairs["noise"], atol=0.1)  # the teacher moved them
    again = make_pairs(family, unet, 5, seed=3, steps=4, guidance=1.5, batch_size=2)
    assert all(np.array_equal(pairs[k], again[k]) for k in pairs)


def test_a_pairs_file_round_trips_and_is_never_overwritten(family, unet, tmp_path):
    pairs = make_pairs(family, unet, 4, steps=2)
    meta = {"guidance": 1.0, "teacher": "t", "teacher_fingerprint": teacher_fingerprint(unet)}
    save_pairs(tmp_path / "p.npz", pairs, meta)
    loaded = load_pairs(tmp_path / "p.npz", family, teacher=unet, guidance=1.0)
    assert loaded.meta == meta and len(loaded) == 4
    assert all(np.array_equal(getattr(loaded, k).numpy(), pairs[k]) for k in pairs)
    before = (tmp_path / "p.npz").read_bytes()
    with pytest.raises(PairsError, match="already exists"):
        save_pairs(tmp_path / "p.npz", make_pairs(family, unet, 4, seed=1, steps=2), {})
    assert (tmp_path / "p.npz").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npz"]  # no partial file left behind


@pytest.mark.parametrize("damage, message", [
    ("absent", "no such file"),
    ("garbage", "not a readable .npz"),
    ("no target", "missing array"),
    ("other size", "do not fit"),
    ("label 3", "labels must be in 0..2"),
    ("nan", "NaN"),
    ("float labels", "labels must be a non-empty list of integers"),
    ("no meta", "no readable meta"),
    ("broken meta", "no readable meta"),
    ("other teacher", "made with another teacher"),
    ("other guidance", "made at guidance 1.0, but real_guidance is 2.0"),
])
def test_a_bad_pairs_file_is_named_with_its_fault(family, make_unet, tmp_path, damage, message):
    unet = make_unet(0)
    pairs = make_pairs(family, unet, 4, steps=2)
    meta = np.array(json.dumps({"guidance": 1.0, "teacher_fingerprint": teacher_fingerprint(unet)}))
    pairs["meta"] = meta
    path = tmp_path / "p.npz"
    if damage == "garbage":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif damage == "no target":
        np.savez(path, noise=pairs["noise"], labels=pairs["labels"])
    elif damage == "other size":
        np.savez(path, **dict(pairs, noise=np.zeros((4, 1, 16, 16), np.float32)))
    elif damage == "label 3":
        np.savez(path, **dict(pairs, labels=np.array([0, 1, 3, 0])))
    elif damage == "nan":
        pairs["target"][1, 0, 2, 2] = np.nan
        np.savez(path, **pairs)
    elif damage == "float labels":
        np.savez(path, **dict(pairs, labels=np.array([0.0, 1.5, 2.0, 0.0])))
    elif damage == "no meta":
        np.savez(path, **{k: v for k, v in pairs.items() if k != "meta"})
    elif damage == "broken meta":
        np.savez(path, **dict(pairs, meta=np.array("{not json")))
    elif damage in ("other teacher", "other guidance"):  # a good file, asked for by another run
        np.savez(path, **pairs)
    teacher = make_unet(1) if damage == "other teacher" else unet
    with pytest.raises(PairsError, match=message) as err:
        load_pairs(path, family, teacher=teacher, guidance=2.0 if damage == "other guidance" else 1.0)
    assert str(path) in str(err.value)


def test_the_config_allows_the_term_only_where_it_means_something(setup, pairs_file):
    with pytest.raises(ConfigError, match="regression_pairs"):
        tiny_distill_config(setup, regression_weight=0.5)
    with pytest.raises(ConfigError, match="1-step"):
        config(setup, pairs_file, student_steps=4)
    with pytest.raises(ConfigError, match="guidance_range"):
        config(setup, pairs_file, guidance_range=[1.0, 3.0])
    with pytest.raises(ConfigError, match="regression_weight"):
        config(setup, pairs_file, regression_weight=-1.0)
    # The term alone is enough for the generator to learn something (DM and GAN off).
    assert config(setup, pairs_file, dm_weight=0.0).regression_weight == 1.0


def test_pairs_made_at_another_guidance_or_missing_stop_the_run_before_training(setup, pairs_file, tmp_path):
    with pytest.raises(PairsError, match="made at guidance 2.0, but real_guidance is 1.0"):
        DMD2Trainer(config(setup, pairs_file, real_guidance=1.0))
    with pytest.raises(PairsError, match="no such file"):
        DMD2Trainer(config(setup, tmp_path / "none.npz"))


def _distance_to_targets(trainer) -> float:
    pairs = trainer.pairs
    with torch.no_grad():
        x = trainer.family.denoise(trainer.generator_module, pairs.noise, trainer.timesteps[0], pairs.labels)
    return float(((x - pairs.target) ** 2).mean())


def test_the_term_alone_pulls_the_student_onto_the_teachers_map(setup, pairs_file):
    trainer = DMD2Trainer(config(setup, pairs_file, dm_weight=0.0, generator_lr=3e-3, warmup_steps=0))
    before = _distance_to_targets(trainer)
    for _ in range(30):
        stats = trainer.train_step()
    assert set(k for k in stats if k.startswith("generator/")) >= {"generator/regression"}
    assert "generator/dm" not in stats
    assert _distance_to_targets(trainer) < 0.5 * before


def test_with_distribution_matching_both_terms_train_and_off_means_off(setup, pairs_file, monkeypatch):
    import training.losses as losses

    seen = []
    dm = losses.distribution_matching_loss
    monkeypatch.setattr(losses, "distribution_matching_loss", lambda x, *a: seen.append(len(x)) or dm(x, *a))
    trainer = DMD2Trainer(config(setup, pairs_file))
    stats = trainer.train_step()
    assert {"generator/dm", "generator/regression"} <= set(stats)
    assert seen == [4]  # distribution matching sees the generator's batch only, not the pairs joined to it
    plain = DMD2Trainer(config(setup, pairs_file, regression_weight=0.0))
    plain_stats = plain.train_step()
    assert plain.pairs is None and "generator/regression" not in plain_stats
    # Same seed and data: the same DM loss (the pairs are drawn by their own sampler), other weights after the
    # step (the regression term's gradient).
    assert stats["generator/dm"] == pytest.approx(plain_stats["generator/dm"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(trainer.generator_module.parameters(),
                                                     plain.generator_module.parameters()))


def test_resume_with_the_term_is_bit_identical(setup, pairs_file, tmp_path):
    cfg = config(setup, pairs_file, iterations=8, checkpoint_every=4, ttur=2)
    straight = distill(cfg, tmp_path / "straight").trainer.state_dict()
    distill(cfg, tmp_path / "split", stop_after=4)
    resumed = distill(cfg, tmp_path / "split", resume=True).trainer.state_dict()
    for name, tensor in straight["generator"].items():
        assert torch.equal(tensor, resumed["generator"][name]), f"generator.{name} differs after resume"
    a, b = straight["ranks"][0]["pair_sampler"], resumed["ranks"][0]["pair_sampler"]
    assert torch.equal(a["perm"], b["perm"]) and a["pos"] == b["pos"] and a["pos"] > 0


def test_resume_refuses_other_pairs_and_names_them(setup, family, pairs_file, tmp_path):
    cfg = config(setup, pairs_file, iterations=8, checkpoint_every=4, ttur=2)
    distill(cfg, tmp_path / "run", stop_after=4)
    other = write_pairs(family, family.load_teacher(setup[0]), tmp_path / "other.npz", num=5)
    with pytest.raises(RunError, match="trained on other regression pairs .*other.npz"):
        distill(config(setup, other, iterations=8, checkpoint_every=4, ttur=2), tmp_path / "run", resume=True)


def test_the_pairs_command_writes_a_file_and_refuses_to_overwrite_it(setup, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "p.npz"
    cmd = [sys.executable, "-m", "training", "pairs", "--teacher", str(setup[0]), "--num", "3", "--steps", "2",
           "--guidance", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    family = PixelFamily(num_classes=3, image_size=8, channels=1)
    pairs = load_pairs(out, family, teacher=family.load_teacher(setup[0]), guidance=2.0)
    assert len(pairs) == 3 and pairs.meta["steps"] == 2 and "training pairs" in pairs.meta["command"]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run([*cmd[:5], str(tmp_path / "no-teacher"), *cmd[6:-1], str(tmp_path / "q.npz")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no-teacher" in bad.stderr and "Traceback" not in bad.stderr
    npy = subprocess.run([*cmd[:-1], str(tmp_path / "p.np")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert npy.returncode == 1 and "must end in .npz" in npy.stderr and "pairs" not in npy.stdout
