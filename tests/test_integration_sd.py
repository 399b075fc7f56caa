"""End to end on tiny SDXL / SD1.5 pipelines: the trainer's `run/student` is what the inference side reads.

Three 2-iteration distillations (SDXL full 1-step at t=399, SDXL 4-step LoRA, SD1.5 1-step), then each
exported student goes through the registry (spec_for, load, generate), `python -m dmd2 evaluate --prompts`
(in process, FID with a random-weight Inception file), `python -m dmd2 push` (a recording HfApi), and the
SDXL ones through the app's text mode (build_app, served on localhost, called with gradio_client).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from conftest import make_caption_folder, served
from dmd2 import registry
from dmd2.__main__ import main
from dmd2.metrics.inception import FIDInception
from dmd2.sampling import initial_noise
from training.config import DistillConfig
from training.distill import distill

PROMPTS = ["a photo of a cat", "a red dog"]
CASES = {  # run name -> (family, config overrides)
    "sdxl-1step": ("sdxl", dict(student_steps=1, first_timestep=399)),
    "sdxl-4step-lora": ("sdxl", dict(student_steps=4, backward_simulation=True, lora_rank=4, lora_alpha=2.0)),
    "sd15-1step": ("sd15", dict(student_steps=1)),
}


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts with empty model and family caches."""
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny teachers, captioned images, a prompt file, reference images and a random FID Inception file,
    and one finished 2-iteration run per case."""
    root = tmp_path_factory.mktemp("integration")
    (root / "prompts.txt").write_text("\n".join(PROMPTS + ["a blue cat"]) + "\n")
    rng = np.random.default_rng(0)
    (root / "ref").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(FIDInception().net.state_dict(), root / "inception.pth")
    w = {"root": root, "sdxl": tiny_sd.make_tiny_sdxl(root / "tiny-sdxl"),
         "sd15": tiny_sd.make_tiny_sd15(root / "tiny-sd15"), "data": make_caption_folder(root / "data")}
    runs = {}
    for name, (family, overrides) in CASES.items():
        cfg = DistillConfig(**dict(
            family=family, teacher=str(w[family]), data=str(w["data"]), prompts=str(root / "prompts.txt"),
            latent_cache_dir=str(root / f"cache-{family}"), batch_size=2, iterations=2, ttur=1, warmup_steps=1,
            log_every=1, sample_every=0, eval_every=0, checkpoint_every=0, mixed_precision="no", ema_decay=0.0,
            generator_lr=1e-3, critic_lr=1e-3, real_guidance=8.0 if family == "sdxl" else 1.75,
            gan_generator_weight=5e-3, **overrides)).validate()
        runs[name] = distill(cfg, root / "runs" / name)
    w["runs"] = runs
    return w


@pytest.mark.parametrize("name", list(CASES))
def test_exported_student_loads_and_generates_through_the_registry(world, name):
    run = world["runs"][name]
    family, overrides = CASES[name]
    tr = run.trainer
    assert run.status()["state"] == "finished" and tr.generator_updates == 2
    meta = json.loads((run.student / "dmd2.json").read_text())
    assert (meta["family"], meta["teacher"], meta["timesteps"]) == (family, str(world[family]), tr.timesteps)

    spec = registry.spec_for(str(run.student))
    assert (spec.kind, spec.family, spec.conditioning) == ("student", family, "text")
    assert spec.timesteps == tuple(tr.timesteps) and spec.base == str(world[family])
    if "lora" in name:
        assert meta["lora"] == "pytorch_lora_weights.safetensors"
        assert spec.weights == str(run.student / meta["lora"])
    model = registry.load(str(run.student))
    steps = overrides["student_steps"]
    a, b = model.generate(prompts=PROMPTS, seed=11), model.generate(prompts=PROMPTS, seed=11)
    assert a.images.shape == (2, 16, 16, 3) and a.prompts == PROMPTS
    assert np.array_equal(a.images, b.images)                       # same seed, same images
    assert a.nfe == steps == len(model.timesteps) and a.extra["timesteps"] == tr.timesteps
    assert not np.array_equal(model.generate(prompts=PROMPTS, seed=12).images, a.images)

    # The registry serves the trained weights (fused LoRA included), not the teacher's.
    fam = model.family
    x, t, cond = initial_noise(fam, 2, seed=3), torch.tensor(tr.timesteps[:1] * 2), fam.condition(PROMPTS)
    with torch.no_grad():
        ours = fam.model_output(model.unet, x, t, cond)
        trained = fam.model_output(tr.student(), x, t, cond)
        teacher = fam.model_output(fam.load_teacher(), x, t, cond)
    torch.testing.assert_close(ours, trained, atol=1e-5, rtol=1e-4)
    assert (trained - teacher).abs().max() > 1e-6


def test_evaluate_cli_on_an_exported_lora_student(world, tmp_path, capsys):
    """One case only: each FID takes a 2048-d matrix square root (about 14 s on one busy core); the
    other students reach the CLI through the same spec_for / load tested above."""
    name = "sdxl-4step-lora"
    root, run = world["root"], world["runs"][name]
    out = tmp_path / "result.json"
    main(["evaluate", "--model", str(run.student), "--prompts", str(root / "prompts.txt"), "--num", "2",
          "--ref-images", str(root / "ref"), "--inception-weights", str(root / "inception.pth"), "--no-clip",
          "--batch-size", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["nfe"] == CASES[name][1]["student_steps"] and result["n"] == 2 and result["ref_num"] == 3
    assert result["fid"] > 0 and result["ms_per_image"] > 0
    assert "fid" in capsys.readouterr().out


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the commit, sends nothing."""

    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, **kwargs):
        RecordingHfApi.calls.append(("create_repo", repo_id))

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        RecordingHfApi.calls.append(("create_commit", repo_id, operations))


@pytest.mark.parametrize("name", ["sdxl-1step", "sdxl-4step-lora"])
def test_push_accepts_the_trainers_finished_run(world, name, monkeypatch, capsys):
    import huggingface_hub

    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    run = world["runs"][name]
    main(["push", "--run", str(run.path), "--repo", f"me/{name}"])
    assert capsys.readouterr().out.strip() == f"pushed {run.student} to https://huggingface.co/me/{name}"
    (_, repo), (_, _, ops) = RecordingHfApi.calls
    uploaded = {op.path_in_repo for op in ops}
    assert uploaded == {p.name for p in run.student.iterdir()} | {"README.md"}
    assert "dmd2.json" in uploaded and "MODEL_CARD.md" in uploaded
    readme = next(op for op in ops if op.path_in_repo == "README.md").path_or_fileobj.decode()
    assert readme.startswith("---\nlibrary_name: diffusers\n") and "- text-to-image" in readme


def test_sdxl_students_are_models_of_the_apps_sdxl_mode(world, tmp_path):
    from gradio_client import Client

    from dmd2.ui.app import build_app

    runs = world["runs"]
    models = [str(world["sdxl"]), str(runs["sdxl-1step"].student), str(runs["sdxl-4step-lora"].student)]
    assert {registry.spec_for(m).family for m in models} == {"sdxl"}    # what app.py checks for --family sdxl
    demo = build_app(models, votes_path=tmp_path / "votes.sqlite", family="sdxl")
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        out = client.predict("a photo of a cat", 5, 1, 1, 1.0, api_name="/compare")
    captions = out[1::2]
    assert captions[0].startswith("tiny-sdxl: NFE 1, steps 1, ")
    assert captions[1].startswith("sdxl-1step: NFE 1, steps 1, ")                  # named after the run
    assert captions[2].startswith("sdxl-4step-lora: NFE 4, steps 4, ")
    assert all(np.asarray(Image.open(img)).shape == (16, 16, 3) for img in out[0::2])


def test_finished_runs_full_and_lora_join_compare_and_arena(world, tmp_path):
    """The app's runs folder holds the three finished runs: the SDXL app takes both SDXL students (the LoRA one
    has no config.json) and leaves the SD1.5 one out."""
    from gradio_client import Client

    from dmd2.ui.app import app_models, build_app
    from dmd2.ui.train import TrainManager

    runs_root = world["root"] / "runs"
    teacher = str(world["sdxl"])
    students = {name: str(run.student) for name, run in world["runs"].items()}
    assert app_models([teacher], runs_root, "sdxl") == [teacher, students["sdxl-1step"], students["sdxl-4step-lora"]]
    demo = build_app([teacher], votes_path=tmp_path / "votes.sqlite", family="sdxl", trainer=TrainManager(runs_root))
    with served(demo) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        assert sorted(client.predict(api_name="/compare_more_models")) == ["sdxl-1step", "sdxl-4step-lora"]
        [item] = client.predict(["sdxl-4step-lora"], "a photo of a cat", 5, 1, 1, 1.0, api_name="/compare_more")
        assert item["caption"].startswith("sdxl-4step-lora: NFE 4, steps 4, ")
        seen = set()
        for _ in range(12):                          # each round draws 2 of the 3 models: the LoRA one in 2/3
            token, *_ = client.predict("a photo of a cat", api_name="/new_round")
            seen |= set(client.predict(token, "tie", api_name="/vote").values())
            if "sdxl-4step-lora" in seen:
                break
    assert "sdxl-4step-lora" in seen and "sd15-1step" not in seen


def test_sd15_student_is_a_model_of_the_apps_sd15_mode(world, tmp_path):
    import gradio as gr

    from dmd2.ui.app import build_app

    models = [str(world["sd15"]), str(world["runs"]["sd15-1step"].student)]
    assert {registry.spec_for(m).family for m in models} == {"sd15"}
    demo = build_app(models, votes_path=tmp_path / "votes.sqlite", family="sd15")
    panels = [b.label for b in demo.blocks.values() if isinstance(b, gr.Image) and b.label in ("tiny-sd15", "sd15-1step")]
    assert panels == ["tiny-sd15", "sd15-1step"]          # Compare's panels; Arena's images are anonymous
    assert [b.label for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.label == "Prompt"]
