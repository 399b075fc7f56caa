"""`python -m dmd2 evaluate` on text-to-image models (tiny SDXL pipelines, a random-weight FID Inception,
a tiny random open_clip) and `python -m dmd2 push` against a recording stand-in for huggingface_hub's HfApi."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_sd
from dmd2 import registry
from dmd2.__main__ import main
from dmd2.metrics.clip_score import ClipScorer
from dmd2.metrics.inception import FIDInception
from dmd2.metrics.text_to_image import TextToImageMetrics, evaluate_text_model

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a cat", "a red dog", "a blue cat", "a photo of a red dog"]


def run(*args, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "dmd2", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SDXL pipeline, a prompt file, 6 reference images and a random-weight FID Inception file."""
    root = tmp_path_factory.mktemp("eval")
    sdxl = tiny_sd.make_tiny_sdxl(root / "tiny-sdxl")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "empty.txt").write_text("\n\n")
    rng = np.random.default_rng(0)
    (root / "ref").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "ref" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(FIDInception().net.state_dict(), root / "inception.pth")
    return root, sdxl


def test_evaluate_a_text_model_writes_fid_and_timing(files):
    root, sdxl = files
    out = root / "result.json"
    r = run("evaluate", "--model", sdxl, "--prompts", root / "prompts.txt", "--num", 3, "--steps", 1,
            "--ref-images", root / "ref", "--inception-weights", root / "inception.pth", "--no-clip",
            "--batch-size", 2, "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["num"] == result["n"] == 3 and result["ref_num"] == 6
    assert result["nfe"] == 2 and result["steps"] == 1            # 1 DDIM step with SDXL's CFG
    assert result["fid"] > 0 and result["ms_per_image"] > 0
    assert result["patch_fid"] is None and "smaller than the 299 x 299 patch" in result["patch_fid_skipped"]
    assert result["fid_network"] == "pt_inception-2015-12-05" and "clip_score" not in result
    assert "fid" in r.stdout and "ms_per_image" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "{sdxl}"], "is a text-to-image model: give it --prompts FILE"),
    (["--model", "{sdxl}", "--prompts", "{root}/empty.txt"], "no prompts in"),
    (["--model", "{sdxl}", "--prompts", "{root}/absent.txt"], "prompt file not found"),
    (["--model", "{sdxl}", "--prompts", "{root}/prompts.txt", "--num", "9"], "holds only 4 prompts"),
    (["--model", "{sdxl}", "--prompts", "{root}/prompts.txt", "--no-clip"], "nothing to compute"),
    (["--model", "{sdxl}", "--prompts", "{root}/prompts.txt", "--clip-weights", "{root}/absent.bin"],
     "CLIP weights not found"),
    (["--model", "{sdxl}", "--prompts", "{root}/prompts.txt", "--ref-images", "{root}/ref",
      "--inception-weights", "{root}/absent.pth", "--no-clip"], "pt_inception-2015-12-05-6726825d.pth"),
    (["--model", "{sdxl}", "--prompts", "{root}/prompts.txt", "--ref-images", "{root}/no-such-folder",
      "--inception-weights", "{root}/inception.pth", "--no-clip"], "reference image folder not found"),
    (["--model", "sdxl-teacher", "--prompts", "{root}/prompts.txt", "--ref-images", "{root}/ref",
      "--inception-weights", "{root}/inception.pth", "--no-clip"], "not in the local cache"),
    (["--model", "mnist-teacher", "--prompts", "{root}/prompts.txt"], "--prompts: only for text-to-image models"),
])
def test_text_evaluate_errors_are_one_clear_line(files, tmp_path, monkeypatch, capsys, args, message):
    import huggingface_hub.constants

    root, sdxl = files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as e:      # in process: the same main() as `python -m dmd2`, minus the start-up
        main(["evaluate", *[a.format(root=root, sdxl=sdxl) for a in args]])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_evaluate_text_model_scores_the_generated_images(files, monkeypatch):
    """In process, with a tiny random open_clip: the CLIP score is the mean over the very images sampled."""
    import open_clip

    _, sdxl = files
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16,
                                                          patch_size=8),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    clip = ClipScorer(model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-g-14"))
    teacher = registry.load(str(sdxl))
    seen = []
    result = evaluate_text_model(teacher, PROMPTS, TextToImageMetrics(clip=clip), seed=5, steps=1, batch_size=3,
                                 progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 4), (4, 4)] and result["n"] == 4 and result["nfe"] == 2
    images = np.concatenate([teacher.generate(prompts=PROMPTS[:3], seed=5, steps=1).images,
                             teacher.generate(prompts=PROMPTS[3:], seed=6, steps=1).images])   # batch b: seed + b
    assert result["clip_score"] == pytest.approx(clip.scores(images, PROMPTS).mean(), abs=1e-9)


# --- push ------------------------------------------------------------------------------------------------
class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls, sends nothing."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        if RecordingHfApi.fail is not None:
            raise RecordingHfApi.fail
        RecordingHfApi.calls.append(("create_repo", repo_id, kwargs, self.token))

    def create_commit(self, repo_id, operations, commit_message, **kwargs):
        RecordingHfApi.calls.append(("create_commit", repo_id, operations, commit_message))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    RecordingHfApi.calls, RecordingHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return RecordingHfApi


def make_run(folder, state="finished"):
    """A run folder as training.distill leaves it: status.json and student/ (a pixel UNet here)."""
    from conftest import tiny_pixel_unet
    from dmd2.families.pixel import PixelFamily

    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"state": state, "step": 10}))
    PixelFamily().save_student(tiny_pixel_unet(), folder / "student", timesteps=[999], family="pixel",
                               teacher="assets/mnist/teacher")
    (folder / "student" / "MODEL_CARD.md").write_text("# DMD2 1-step student\n\n- steps: 10\n")
    return folder


def push(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["push", *map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_push_uploads_the_student_and_its_card_in_one_commit(tmp_path, hub, capsys):
    run_dir = make_run(tmp_path / "runs" / "mnist-1step")
    code, out, err = push(capsys, "--run", run_dir, "--repo", "me/dmd2-mnist-1step", "--private")
    assert code == 0, err
    assert out.strip() == f"pushed {run_dir / 'student'} to https://huggingface.co/me/dmd2-mnist-1step"
    (c1, repo, kwargs, token), (c2, repo2, ops, message) = hub.calls
    assert (c1, repo, c2, repo2, token) == ("create_repo", "me/dmd2-mnist-1step", "create_commit",
                                            "me/dmd2-mnist-1step", "hf_test_token")
    assert kwargs["private"] is True and kwargs["exist_ok"] is True and "mnist-1step" in message
    paths = {op.path_in_repo for op in ops}
    assert paths == {"config.json", "diffusion_pytorch_model.safetensors", "dmd2.json", "scheduler_config.json",
                     "MODEL_CARD.md", "README.md"}
    readme = next(op for op in ops if op.path_in_repo == "README.md").path_or_fileobj.decode()
    assert readme.startswith("---\nlibrary_name: diffusers\n") and "- dmd2" in readme
    assert readme.endswith("# DMD2 1-step student\n\n- steps: 10\n") and "base_model" not in readme


@pytest.mark.parametrize("case, message", [
    ("missing", "run folder not found"),
    ("running", "is not a finished run (state: running)"),
    ("no card", "MODEL_CARD.md is missing"),
    ("bad repo", "--repo must look like owner/name"),
    ("no token", "not logged in to the Hugging Face Hub: run `hf auth login`"),
    ("hub error", "could not push to me/x: ConnectionError: no route"),
])
def test_push_errors_are_one_clear_line(tmp_path, hub, capsys, monkeypatch, case, message):
    import huggingface_hub

    run_dir = tmp_path / "run"
    if case != "missing":
        make_run(run_dir, state="running" if case == "running" else "finished")
    if case == "no card":
        (run_dir / "student" / "MODEL_CARD.md").unlink()
    if case == "no token":
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    if case == "hub error":
        hub.fail = ConnectionError("no route to host\nmore detail")
    code, _, err = push(capsys, "--run", run_dir, "--repo", "me/x/y" if case == "bad repo" else "me/x")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not [c for c in hub.calls if c[0] == "create_commit"]
