"""Text-to-image models in the registry: tiny SDXL / SD1.5 pipelines, our own students (UNet folder or
LoRA) and the built-in SDXL names served from a Hugging Face cache laid out on disk, with no network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import tiny_sd
from dmd2 import registry
from dmd2.families.base import ModelLoadError
from dmd2.families.sdxl import SDXLFamily
from dmd2.images import to_uint8
from dmd2.prompts import check_prompt, read_prompts
from dmd2.sampling import initial_noise, renoise_seed, student_sample

PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Each test starts with empty model and family caches (the built-in names are global)."""
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny SDXL pipeline, a 2-step student folder of it, a LoRA student folder, and a tiny SD1.5 pipeline."""
    root = tmp_path_factory.mktemp("text-models")
    sdxl = tiny_sd.make_tiny_sdxl(root / "tiny-sdxl")
    fam = SDXLFamily.from_pretrained(sdxl)
    torch.manual_seed(1)
    student = fam.unet_from_state_dict(tiny_sd.tiny_unet(sdxl=True).state_dict())
    fam.save_student(student, root / "student-2step", timesteps=[999, 499])
    lora = root / "lora-student"
    lora.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"mid_block.attentions.0.proj_in.lora_A.weight": torch.randn(2, 8, generator=g),
               "mid_block.attentions.0.proj_in.lora_B.weight": torch.randn(8, 2, generator=g)},
              str(lora / "dmd2_lora.safetensors"))
    (lora / "dmd2.json").write_text(json.dumps({"family": "sdxl", "teacher": str(sdxl), "timesteps": [999]}))
    return dict(sdxl=str(sdxl), student=str(root / "student-2step"), lora=str(lora),
                sd15=str(tiny_sd.make_tiny_sd15(root / "tiny-sd15")))


def test_specs_of_local_text_models(models):
    teacher = registry.spec_for(models["sdxl"])
    assert (teacher.kind, teacher.family, teacher.conditioning, teacher.base) == ("teacher", "sdxl", "text",
                                                                               models["sdxl"])
    student = registry.spec_for(models["student"])
    assert (student.kind, student.family, student.timesteps, student.base) == ("student", "sdxl", (999, 499),
                                                                               models["sdxl"])
    lora = registry.spec_for(models["lora"])
    assert lora.weights.endswith("dmd2_lora.safetensors") and lora.timesteps == (999,)
    assert registry.spec_for(lora.weights).weights == lora.weights        # the LoRA file itself works too
    assert registry.spec_for(models["sd15"]).family == "sd15"
    assert registry.spec_for("mnist-teacher").conditioning == "class"


def test_bad_local_text_models_fail_clearly(models, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelLoadError, match="KandinskyV22Pipeline pipeline; supported: StableDiffusionXLPipeline"):
        registry.spec_for(str(tmp_path / "other"))
    (tmp_path / "no-teacher").mkdir()
    (tmp_path / "no-teacher" / "dmd2.json").write_text(json.dumps({"family": "sdxl", "timesteps": [999]}))
    (tmp_path / "no-teacher" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="must name the student's 'teacher'"):
        registry.spec_for(str(tmp_path / "no-teacher"))
    (tmp_path / "two-loras").mkdir()
    (tmp_path / "two-loras" / "dmd2.json").write_text(json.dumps({"family": "sdxl", "teacher": "x", "timesteps": [1]}))
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "two-loras" / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match="expected one LoRA file"):
        registry.spec_for(str(tmp_path / "two-loras"))


def test_text_teacher_and_student_generate_from_prompts(models):
    teacher, student = registry.load(models["sdxl"]), registry.load(models["student"])
    assert teacher.conditioning == student.conditioning == "text" and teacher.num_classes is None
    assert teacher.family is student.family                   # text encoders and VAE loaded once
    out = teacher.generate(prompts=PROMPTS, seed=3, steps=2)
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == np.uint8
    assert out.prompts == PROMPTS and out.labels is None
    assert out.nfe == 4 and out.extra == {"guidance": 5.0, "steps": 2}       # SDXL's CFG 5: 2 passes per step
    assert np.array_equal(teacher.generate(PROMPTS, seed=3, steps=2).images, out.images)   # prompts positionally
    assert not np.array_equal(teacher.generate(prompts=PROMPTS, seed=4, steps=2).images, out.images)
    assert teacher.generate(prompts=PROMPTS, seed=3, steps=2, guidance=1.0).nfe == 2

    s = student.generate(prompts=PROMPTS, seed=3)
    assert s.nfe == 2 and s.extra == {"timesteps": [999, 499], "steps": 2}
    fam = student.family        # by hand: the same noise, the student sampler, the VAE
    x = student_sample(fam, student.unet, fam.condition(PROMPTS), initial_noise(fam, 2, 3), [999, 499],
                       seed=renoise_seed(3))   # the re-noising stream is not the starting noise's
    assert np.array_equal(s.images, to_uint8(fam.decode(x)))
    assert not np.array_equal(s.images, out.images)


def test_lora_student_and_sd15(models):
    lora, teacher = registry.load(models["lora"]), registry.load(models["sdxl"])
    diff = {n for n, p in lora.unet.named_parameters() if not torch.equal(p, teacher.unet.get_parameter(n))}
    assert diff == {"mid_block.attentions.0.proj_in.weight"}
    assert lora.generate(prompts="a cat", seed=0).images.shape == (1, 16, 16, 3)
    sd15 = registry.load(models["sd15"])
    out = sd15.generate(prompts=PROMPTS, seed=0, steps=1)
    assert out.images.shape == (2, 16, 16, 3) and out.extra["guidance"] == 7.5


def test_prompts_versus_labels(models):
    teacher = registry.load(models["sdxl"])
    with pytest.raises(ValueError, match="text-to-image model: give it prompts"):
        teacher.generate(prompts=[], seed=0)
    with pytest.raises(ValueError, match="class-conditional: give it labels"):
        registry.load("mnist-teacher").generate([1], seed=0, prompts=["a one"])


def test_check_prompt_says_which_limit(models):
    tokenizer = registry.load(models["sdxl"]).family.tokenizer            # the tiny one reads 16 tokens
    assert check_prompt("  a red cat \n", tokenizer) == "a red cat"
    with pytest.raises(ValueError, match="the prompt is empty"):
        check_prompt("   ", tokenizer)
    with pytest.raises(ValueError, match="the prompt is 301 characters long; at most 300"):
        check_prompt("x" * 301)
    with pytest.raises(ValueError, match="must be text"):
        check_prompt(None)
    words = "a photo of a cat " * 3                                       # 15 words: 17 tokens with start/end
    with pytest.raises(ValueError, match="17 CLIP tokens long .* reads at most 16"):
        check_prompt(words, tokenizer)
    assert registry.load(models["sdxl"]).check_prompt("a photo of a cat") == "a photo of a cat"


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts in .*empty.txt: it is empty"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(tmp_path / "absent.txt")
    import pandas as pd

    pd.DataFrame({"id": [1, 2, 3], "caption": ["a bus", None, "two birds"]}).to_parquet(tmp_path / "c.parquet")
    assert read_prompts(tmp_path / "c.parquet") == ["a bus", "two birds"]
    pd.DataFrame({"id": [1]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no prompt / caption / text column"):
        read_prompts(tmp_path / "bad.parquet")


# --- the built-in SDXL names -------------------------------------------------------------------------
def _cache_repo(cache, repo: str, files: dict, revision="0" * 40):
    """Lay out `files` (name -> source path or bytes) as the Hugging Face cache holds a downloaded repo."""
    import shutil

    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    snap = folder / "snapshots" / revision
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            (snap / name).write_bytes(src)
        elif src.is_dir():
            shutil.copytree(src, snap / name, dirs_exist_ok=True)
        else:
            shutil.copy(src, snap / name)
    return snap


def test_sdxl_names_are_unavailable_offline_and_say_why(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.available() == registry.available("pixel")
    assert "sdxl-teacher" not in registry.available() and registry.available("sdxl") == []
    with pytest.raises(ModelLoadError) as e:
        registry.load("dmd2-sdxl-4step")
    msg = str(e.value)
    assert "Hugging Face Hub" in msg and "GPU" in msg
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in msg
    assert "hf download tianweiy/DMD2 dmd2_sdxl_4step_unet_fp16.bin" in msg
    assert registry.spec_for("dmd2-sdxl-1step").timesteps == (399,)


def test_sdxl_names_load_from_the_cache_without_network(models, tmp_path, monkeypatch):
    """With the teacher and a student file in the cache, the built-in names are available and load offline."""
    import huggingface_hub.constants

    from pathlib import Path

    cache = tmp_path / "hub"
    _cache_repo(cache, "stabilityai/stable-diffusion-xl-base-1.0", {".": Path(models["sdxl"])})
    torch.manual_seed(2)
    state = {k: v.half() for k, v in tiny_sd.tiny_unet(sdxl=True).state_dict().items()}
    torch.save(state, tmp_path / "student.bin")
    _cache_repo(cache, "tianweiy/DMD2", {"dmd2_sdxl_4step_unet_fp16.bin": tmp_path / "student.bin"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert registry.available("sdxl") == ["sdxl-teacher", "dmd2-sdxl-4step"]
    assert set(registry.available()) == set(registry.available("pixel")) | {"sdxl-teacher", "dmd2-sdxl-4step"}

    student = registry.load("dmd2-sdxl-4step")
    assert student.timesteps == (999, 749, 499, 249) and student.family is registry.load("sdxl-teacher").family
    assert all(torch.equal(p, state[n].float()) for n, p in student.unet.state_dict().items())
    out = student.generate(prompts=PROMPTS, seed=0)
    assert out.images.shape == (2, 16, 16, 3) and out.nfe == 4
