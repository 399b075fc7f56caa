"""The teacher trainer: the loss falls, the outputs are a loadable diffusers folder plus logs."""

import json

import pytest

from dmd2.families.pixel import PixelFamily, load_pixel_unet
from dmd2.sampling import ddim_sample, initial_noise
from training.data import DataError
from training.teacher import main, train_teacher

from conftest import make_two_class_folder

STEPS = 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny teacher trained for 40 steps on 12 'left'/'right' half-bright 16x16 images (~4 s)."""
    base = tmp_path_factory.mktemp("teacher")
    make_two_class_folder(base / "images")
    out = train_teacher(data=str(base / "images"), out=str(base / "out"), steps=STEPS, batch_size=16,
                        lr=3e-3, warmup=1, image_size=16, block_out_channels=(8, 16),
                        log_every=1, save_every=1000, seed=0)
    return out


def test_writes_a_diffusers_folder_and_logs(trained):
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "training.json", "train_log.jsonl"):
        assert (trained / name).is_file(), name
    facts = json.loads((trained / "training.json").read_text())
    assert facts["steps_done"] == STEPS and facts["parameters"] > 0 and facts["seed"] == 0
    records = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all({"loss", "grad_norm", "lr", "seconds"} <= r.keys() for r in records)


def test_loss_falls(trained):
    losses = [json.loads(line)["loss"] for line in (trained / "train_log.jsonl").read_text().splitlines()]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_output_loads_and_learned_the_classes(trained):
    unet = load_pixel_unet(trained)
    cfg = unet.config
    assert list(cfg.block_out_channels) == [8, 16]
    assert cfg.sample_size == 16 and cfg.in_channels == 1 and cfg.num_class_embeds == 3  # 2 classes + null
    family = PixelFamily.from_unet(unet)
    assert family.num_classes == 2
    noise = initial_noise(family, 4, seed=0)
    left = ddim_sample(family, unet, family.condition([0] * 4), noise, steps=8)
    right = ddim_sample(family, unet, family.condition([1] * 4), noise, steps=8)
    # class 0 ('left') is bright on the left half, class 1 on the right half
    assert left[..., :8].mean() - left[..., 8:].mean() > 0.5
    assert right[..., 8:].mean() - right[..., :8].mean() > 0.5


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--batch-size", "0"], ["--label-dropout", "1.0"]])
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_bad_data_folder_fails_before_training(tmp_path):
    with pytest.raises(DataError):
        train_teacher(data=str(tmp_path / "missing"), out=str(tmp_path / "out"), steps=1)
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


@pytest.mark.parametrize("argv, expected", [([], None), (["--bf16"], True), (["--no-bf16"], False)])
def test_cli_precision_defaults_to_the_hardware(monkeypatch, argv, expected):
    """No flag: bf16 only where the hardware has it (train_teacher resolves None); the flags force either way."""
    import training.teacher as teacher_module

    seen = {}
    monkeypatch.setattr(teacher_module, "train_teacher", lambda **kw: seen.update(kw))
    teacher_module.main(argv)
    assert seen["bf16"] is expected
