"""FSDP2 on 2 CPU processes (gloo): the trainer shards the generator and the critic itself, per UNet block;
a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one; the exported student is the
gathered full generator; the ranks agree."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny_sd
from conftest import free_port, make_caption_folder
from training import sharding
from training.config import DistillConfig
from training.runs import Run

ROOT = Path(__file__).resolve().parent.parent


def test_shard_units_are_the_accelerate_configs():
    """The trainer's own shard units are the classes configs/accelerate/fsdp.yaml wraps."""
    cfg = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert tuple(cfg["fsdp_transformer_layer_cls_to_wrap"].split(",")) == sharding.UNIT_CLASSES


def test_fsdp_is_not_asked_for_by_one_process(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not sharding.fsdp_requested(Accelerator(cpu=True))  # one process: nothing to shard over


@pytest.fixture(scope="module")
def fsdp_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    (root / "prompts.txt").write_text("a photo of a dog\na blue cat\na red photo\n")
    cfg = DistillConfig(family="sdxl", teacher=str(tiny_sd.make_tiny_sdxl(root / "sdxl")),
                        data=str(make_caption_folder(root / "data")), prompts=str(root / "prompts.txt"),
                        latent_cache_dir=str(root / "cache"), batch_size=2, iterations=8, ttur=2, warmup_steps=1,
                        log_every=1, sample_every=4, eval_every=0, checkpoint_every=2, keep_checkpoints=5,
                        mixed_precision="no", ema_decay=0.0, generator_lr=1e-3, critic_lr=1e-3, real_guidance=8.0,
                        gan_generator_weight=5e-3).validate()
    (root / "cfg.yaml").write_text(json.dumps(cfg.to_dict()))
    return root / "cfg.yaml"


def torchrun(cfg_file: Path, out: Path, *extra: str) -> subprocess.Popen:
    """The FSDP worker on 2 processes."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    # PYTHONFAULTHANDLER: a rank that dies of a signal prints its Python stack (one run of CI saw a rank die of
    # SIGSEGV inside gloo's all-gather during the uninterrupted run, once; reruns passed)
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_FSDP="true", PYTHONFAULTHANDLER="1",
               PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    return subprocess.Popen([exe, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                             str(free_port()), str(ROOT / "tests" / "fsdp_worker.py"), str(cfg_file), str(out), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (torchrun starts its ranks in sessions of their own)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_minus_nine(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every rank, and wait until all are gone."""
    victims = descendants(proc.pid)
    for pid in [proc.pid, *victims]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()
    deadline = time.time() + 60
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in victims):
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=900)
    crash = out.find("Fatal Python error")  # a rank's faulthandler stack, far above torchrun's summary
    assert proc.returncode == 0, (out[crash:crash + 4000] + "\n...\n" if crash >= 0 else "") + out[-4000:]


def test_fsdp_kill_resume_is_bit_identical_and_exports_the_gathered_generator(fsdp_config, tmp_path):
    finish(torchrun(fsdp_config, tmp_path / "straight"))

    victim = torchrun(fsdp_config, tmp_path / "killed")
    first = tmp_path / "killed/checkpoints/step-00000002/state.pt"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    kill_minus_nine(victim)  # torchrun and both ranks, without a word
    assert Run(tmp_path / "killed").status()["state"] == "running"
    assert not (tmp_path / "killed/student").exists()
    finish(torchrun(fsdp_config, tmp_path / "killed", "--resume"))

    ranks = [torch.load(tmp_path / f"straight/rank{r}.pt", weights_only=True) for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"killed/rank{r}.pt", weights_only=True) for r in (0, 1)]
    r0, r1 = ranks
    assert r0["world_size"] == 2 and r0["sharded"] and r0["step"] == 8
    # Sharding really happened (accelerate on CPU would have run DDP): per-block units, DTensor parameters,
    # each rank holding about half of every model (dim-0 shards of odd sizes are uneven by a row).
    assert {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"} == set(r0["units"]["generator"])
    assert "fake_unet.mid_block" in r0["units"]["critic"]
    for key in ("generator", "critic"):
        assert all(r0[key]["dtensor"].values()) and all(r1[key]["dtensor"].values())
        full = sum(t.numel() for t in r0[key]["full"].values())
        for r in ranks:
            local = sum(t.numel() for t in r[key]["local"].values())
            assert abs(local - full / 2) <= 0.01 * full, (key, local, full)
        for name, tensor in r0[key]["full"].items():
            # The two ranks' shards are the two halves of the full tensor, and both ranks gather the same one.
            assert torch.equal(torch.cat([r0[key]["local"][name], r1[key]["local"][name]]), tensor), name
            assert torch.equal(r1[key]["full"][name], tensor), name

    # The killed-and-resumed run ends where the uninterrupted one does: weights, optimiser states, every
    # rank's shards and random state.
    a = torch.load(tmp_path / "straight/checkpoints/step-00000008/state.pt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoints/step-00000008/state.pt", weights_only=True)
    for key in ("generator", "critic"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), f"{key} differs after resume"
    for opt in ("opt_g", "opt_c"):
        for name, slots in a[opt]["state"].items():
            for slot, value in slots.items():
                assert torch.equal(value, b[opt]["state"][name][slot]), f"{opt} {name}.{slot} differs after resume"
    assert len(a["ranks"]) == 2 and not torch.equal(a["ranks"][0]["rng"], a["ranks"][1]["rng"])
    for r, s in zip(ranks, resumed):
        assert torch.equal(r["rng"], s["rng"])
        assert all(torch.equal(r["generator"]["local"][n], s["generator"]["local"][n]) for n in r["generator"]["local"])
        assert all(torch.equal(r["critic"]["local"][n], s["critic"]["local"][n]) for n in r["critic"]["local"])
    # The generator moved, and the checkpoint holds the full (gathered) weights.
    teacher = load_file(Path(json.loads(Path(fsdp_config).read_text())["teacher"]) / "unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher[n], a["generator"][n]) for n in teacher)
    assert all(torch.equal(a["generator"][n], r0["generator"]["full"][n]) for n in r0["generator"]["full"])

    # The exported student is the gathered generator, in both runs.
    assert Run(tmp_path / "killed").status()["state"] == "finished"
    for run in ("straight", "killed"):
        student = load_file(tmp_path / run / "student/diffusion_pytorch_model.safetensors")
        assert student.keys() == r0["generator"]["full"].keys()
        assert all(torch.equal(student[n], r0["generator"]["full"][n]) for n in student)
    steps = [r["step"] for r in Run(tmp_path / "killed").metrics() if "critic/fake_denoise" in r]
    assert steps == list(range(1, 9))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_transformers_are_sharded_per_block(family, tmp_path):
    """Each SD3 joint block and each FLUX double- and single-stream block is a shard unit of its own (not the
    whole transformer gathered at once), in the generator and in the critic's fake score; the run finishes on 2
    processes and its student is the gathered generator."""
    import tiny_flux
    import tiny_sd3

    make = {"sd3": tiny_sd3.make_tiny_sd3, "flux": tiny_flux.make_tiny_flux}[family]
    (tmp_path / "prompts.txt").write_text("a photo of a dog\na blue cat\n")
    world = {family: make(tmp_path / family), "data": make_caption_folder(tmp_path / "data"),
             "prompts": tmp_path / "prompts.txt", "cache": tmp_path / "cache"}
    cfg = tiny_sd.text_config(world, family, 4.0, iterations=4, ttur=2, sample_every=0, checkpoint_every=2)
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg.to_dict()))
    finish(torchrun(tmp_path / "cfg.yaml", tmp_path / "run"))

    r0, r1 = (torch.load(tmp_path / f"run/rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["sharded"] and r0["step"] == 4
    config = json.loads((world[family] / "transformer/config.json").read_text())
    blocks = [f"transformer_blocks.{i}" for i in range(config["num_layers"])]
    blocks += [f"single_transformer_blocks.{i}" for i in range(config.get("num_single_layers", 0))]
    assert sorted(r0["units"]["generator"]) == sorted(blocks)
    prefix = r0["units"]["critic"][0].removesuffix(blocks[0])    # the fake score's name inside the critic
    assert prefix and sorted(r0["units"]["critic"]) == sorted(prefix + b for b in blocks)
    for key in ("generator", "critic"):
        assert all(r0[key]["dtensor"].values()) and all(r1[key]["dtensor"].values())
        for name, tensor in r0[key]["full"].items():
            assert torch.equal(torch.cat([r0[key]["local"][name], r1[key]["local"][name]]), tensor), name
    student = load_file(tmp_path / "run/student/diffusion_pytorch_model.safetensors")
    full = r0["generator"]["full"]
    # every parameter (the student also holds buffers such as SD3's positional embedding)
    assert full.keys() <= student.keys() and all(torch.equal(student[n], full[n]) for n in full)


@pytest.fixture(scope="module")
def sharded_config(fsdp_config) -> Path:
    """The FSDP run's config with checkpoint_format: sharded (DCP)."""
    cfg = json.loads(Path(fsdp_config).read_text())
    path = Path(fsdp_config).with_name("cfg-sharded.yaml")
    path.write_text(json.dumps({**cfg, "checkpoint_format": "sharded"}))
    return path


def dcp_tensors(checkpoint: Path, tmp: Path) -> dict:
    """A sharded checkpoint's DCP folder as one full state (read in this single process)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "dcp", out)
    return torch.load(out, weights_only=True)


def test_sharded_checkpoints_each_rank_writes_its_shards_and_kill_resume_is_bit_identical(sharded_config, tmp_path):
    finish(torchrun(sharded_config, tmp_path / "straight"))

    victim = torchrun(sharded_config, tmp_path / "killed")
    first = tmp_path / "killed/checkpoints/step-00000002/state.pt"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    kill_minus_nine(victim)
    assert Run(tmp_path / "killed").status()["state"] == "running"
    finish(torchrun(sharded_config, tmp_path / "killed", "--resume"))

    ck = tmp_path / "straight/checkpoints/step-00000008"
    meta = torch.load(ck / "state.pt", weights_only=True)
    # state.pt holds no weights: the networks and optimisers are in dcp/, one shard file per rank, neither of
    # them the whole (no rank wrote the gathered state).
    assert meta["format"] == "sharded" and meta["step"] == 8
    assert all(meta[k] is None for k in ("generator", "critic", "opt_g", "opt_c"))
    files = sorted(p.name for p in (ck / "dcp").glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"], files
    sizes = [(ck / "dcp" / f).stat().st_size for f in files]
    assert max(sizes) < 0.6 * sum(sizes), sizes  # uneven by the many tiny tensors' odd dim-0 splits and metadata

    ranks = [torch.load(tmp_path / f"straight/rank{r}.pt", weights_only=True) for r in (0, 1)]
    resumed = [torch.load(tmp_path / f"killed/rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(all(r["generator"]["dtensor"].values()) for r in ranks)
    a = dcp_tensors(ck, tmp_path)
    b = dcp_tensors(tmp_path / "killed/checkpoints/step-00000008", tmp_path)
    # The killed-and-resumed sharded run ends where the uninterrupted one does: weights, AdamW moments, RNGs.
    for key in ("generator", "critic"):
        assert a[key].keys() == b[key].keys() and a[key]
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), f"{key} differs after resume"
    for opt in ("opt_g", "opt_c"):
        assert a[opt]["state"]
        for name, slots in a[opt]["state"].items():
            for slot, value in slots.items():
                assert torch.equal(value, b[opt]["state"][name][slot]), f"{opt} {name}.{slot} differs after resume"
    for r, s in zip(ranks, resumed):
        assert torch.equal(r["rng"], s["rng"])
        assert all(torch.equal(r["generator"]["local"][n], s["generator"]["local"][n]) for n in r["generator"]["local"])
        assert all(torch.equal(r["critic"]["local"][n], s["critic"]["local"][n]) for n in r["critic"]["local"])
    # The shards put together are the gathered full weights; the exported student equals them.
    full = ranks[0]["generator"]["full"]
    assert a["generator"].keys() == full.keys()
    assert all(torch.equal(a["generator"][n], full[n]) for n in full)
    assert all(torch.equal(a["critic"][n], ranks[0]["critic"]["full"][n]) for n in ranks[0]["critic"]["full"])
    for run in ("straight", "killed"):
        student = load_file(tmp_path / run / "student/diffusion_pytorch_model.safetensors")
        assert student.keys() == full.keys() and all(torch.equal(student[n], full[n]) for n in student)
    steps = [r["step"] for r in Run(tmp_path / "killed").metrics() if "critic/fake_denoise" in r]
    assert steps == list(range(1, 9))

    # training/export.py reads a sharded checkpoint in one process (DCP reshards 2 ranks' shards into 1).
    from training.export import export_checkpoint

    out = export_checkpoint(tmp_path / "straight", tmp_path / "exported", step=8)
    exported = load_file(Path(out) / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == full.keys() and all(torch.equal(exported[n], full[n]) for n in full)
