"""Data of the text families: imagefolder captions, prompt files, the VAE-latent cache, and clear errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dmd2.families.sdxl import SDXLFamily
from training.config import ConfigError, DistillConfig, load_config
from training.data import DataError
from training.text_data import cached_latents, captioned_images, image_folder, read_prompts, to_tensor

import tiny_sd
from conftest import CAPTIONS, make_caption_folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return SDXLFamily.from_pretrained(tiny_sd.make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


def test_image_folder_reads_captions_in_order(tmp_path):
    data = image_folder(make_caption_folder(tmp_path / "data"))
    assert data.captions == CAPTIONS and len(data) == 5
    assert data.load(2).mode == "RGB" and data.load(2).size == (24, 20)
    x = to_tensor(data.load(0), 16)
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1


def test_prompt_files(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\n\n  a red dog  \n")
    assert read_prompts(txt) == ["a cat", "a red dog"]


def test_parquet_prompts(tmp_path):
    import pyarrow as pa                # pinned in requirements.txt: missing, this fails rather than skips
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a cat", None, "a dog"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["a cat", "a dog"]


def test_latent_cache_is_written_once_and_reused(sdxl, tmp_path):
    data = captioned_images(str(make_caption_folder(tmp_path / "data")))
    calls = []
    hook = sdxl.vae.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        first, caps = cached_latents(sdxl, data, 16, tmp_path / "cache", batch_size=2, log=lambda m: None)
        assert sum(calls) == 5  # every image encoded once
        files = list((tmp_path / "cache").glob("latents-*.pt"))
        assert len(files) == 1
        calls.clear()
        again, caps2 = cached_latents(sdxl, data, 16, tmp_path / "cache", log=lambda m: None)
        assert calls == []  # second run: the VAE encoder never ran
        assert torch.equal(first, again) and caps == caps2 == CAPTIONS
        assert first.shape == (5, *sdxl.latent_shape(1)[1:]) and first.dtype == torch.float16
        # the latents are the VAE's scaled posterior samples of the centre-cropped images
        images = torch.stack([to_tensor(data.load(i), 16) for i in range(5)])
        with torch.no_grad():
            mean = sdxl.vae.encode(images).latent_dist.mean * sdxl.vae.config.scaling_factor
        assert (first.float() - mean).abs().mean() < (first.float() - mean.roll(1, 0)).abs().mean()

        # a corrupt cache is rebuilt, with a message, to the same latents
        calls.clear()
        files[0].write_bytes(b"not a cache")
        messages = []
        rebuilt, _ = cached_latents(sdxl, data, 16, tmp_path / "cache", log=messages.append)
        assert sum(calls) == 5 and "rebuilding" in messages[0] and torch.equal(rebuilt, first)
        # a cache made from other data, under this cache's name, is not trusted either
        other = captioned_images(str(make_caption_folder(tmp_path / "other", CAPTIONS[:3])))
        cached_latents(sdxl, other, 16, tmp_path / "cache-other", log=lambda m: None)
        (other_file,) = (tmp_path / "cache-other").glob("latents-*.pt")
        files[0].write_bytes(other_file.read_bytes())
        calls.clear()
        messages.clear()
        again, _ = cached_latents(sdxl, data, 16, tmp_path / "cache", log=messages.append)
        assert "other images" in messages[0] and sum(calls) == 5 and torch.equal(again, first)
        # another resolution or changed captions give another cache file
        (tmp_path / "data" / "metadata.jsonl").write_text(
            "".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n" for i in range(5)))
        calls.clear()
        cached_latents(sdxl, captioned_images(str(tmp_path / "data")), 16, tmp_path / "cache", log=lambda m: None)
        assert sum(calls) == 5 and len(list((tmp_path / "cache").glob("latents-*.pt"))) == 2
    finally:
        hook.remove()


def _base(tmp_path, **kw) -> dict:
    return {"family": "sdxl", "teacher": str(tmp_path / "teacher"), "data": str(tmp_path / "data"), "eval_every": 0, **kw}


def test_bad_inputs_name_the_problem(tmp_path, monkeypatch):
    from training.trainer import DMD2Trainer

    with pytest.raises(ConfigError, match="family.*pixel, sdxl, sd15, sd3, flux"):
        load_config(None, ["family=kandinsky"])
    with pytest.raises(ConfigError, match="eval_every.*MNIST"):
        DistillConfig(family="sdxl", data="x").validate()
    with pytest.raises(ConfigError, match=r"lora_rank.*text families \(sdxl, sd15, sd3, flux\)"):
        DistillConfig(lora_rank=4).validate()
    with pytest.raises(ConfigError, match="prompts.*only for the text families"):
        DistillConfig(prompts="p.txt").validate()
    with pytest.raises(ConfigError, match="prompts.*.txt"):
        DistillConfig(**_base(tmp_path, prompts="p.csv")).validate()
    with pytest.raises(ConfigError, match="frozen_dtype"):
        DistillConfig(**_base(tmp_path, frozen_dtype="bf16", mixed_precision="no")).validate()

    # data errors come before any model is loaded (the teacher folder does not even exist here)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="has no metadata.jsonl"):
        DMD2Trainer(DistillConfig(**_base(tmp_path)).validate())
    with pytest.raises(DataError, match="image folder not found: .*nowhere"):
        DMD2Trainer(DistillConfig(**_base(tmp_path, data=str(tmp_path / "nowhere"))).validate())
    make_caption_folder(tmp_path / "data")
    with pytest.raises(DataError, match="prompt file not found: .*missing.txt"):
        DMD2Trainer(DistillConfig(**_base(tmp_path, prompts=str(tmp_path / "missing.txt"))).validate())
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no prompts in .*empty.txt"):
        DMD2Trainer(DistillConfig(**_base(tmp_path, prompts=str(tmp_path / "empty.txt"))).validate())
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "9.png", "text": "gone"}\n')
    with pytest.raises(DataError, match="line 1: image .*9.png not found"):
        image_folder(tmp_path / "data")
    (tmp_path / "data" / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    with pytest.raises(DataError, match="line 1: no caption"):
        image_folder(tmp_path / "data")

    # optional packages: a clear message naming the package to install
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        captioned_images("hf:someone/captions")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs pyarrow"):
        read_prompts(tmp_path / "p.parquet")
