"""The `compile` and `channels_last` switches (issue 18): a compiled trainer on a tiny teacher trains like the
eager one (losses within float tolerance), keeps plain state-dict keys in its checkpoints and its student,
resumes, and does not recompile once its passes have all run; channels_last trains like eager too.

Compilation is real (inductor, gcc) and slow on a busy CPU, so the UNet is the smallest diffusers builds (one
block, no attention) and the compiled runs share one test. Speed itself is in benchmarks/train_step.py.
Measured on 2 busy cores: about 2 min when inductor's cache (/tmp/torchinductor_$USER) already holds these graphs,
about 7 min with a cold cache (gcc builds the kernels).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from conftest import make_two_class_folder, tiny_distill_config
from training.config import ConfigError, DistillConfig, load_config
from training.distill import distill
from training.runs import Run
from training.trainer import DMD2Trainer

SMALLEST_UNET = dict(block_out_channels=(8,), down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
                     add_attention=False, norm_num_groups=4, layers_per_block=1)
LOSSES = ("critic/fake_denoise", "critic/gan_critic", "generator/dm", "generator/gan_generator")


@pytest.fixture
def setup(tmp_path, family):
    torch.manual_seed(0)
    family.save_student(family.new_unet(**SMALLEST_UNET), tmp_path / "teacher")
    return tmp_path / "teacher", make_two_class_folder(tmp_path / "images")


tiny_config = tiny_distill_config


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def losses(run: Run) -> list[dict]:
    return [{k: r[k] for k in LOSSES if k in r} for r in run.metrics() if "critic/fake_denoise" in r]


def assert_losses_close(a: Run, b: Run) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 10 and [sorted(r) for r in la] == [sorted(r) for r in lb]
    for step, (ra, rb) in enumerate(zip(la, lb), 1):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-4), f"step {step}: {k}"


# Weights after 10 AdamW steps at lr 1e-3: Adam divides each gradient element by its own scale, so an element
# near zero that rounds differently moves by up to lr in a step; losses are the tighter comparison.
WEIGHTS = dict(rtol=1e-3, atol=1e-3)


def final_state(run: Run) -> dict:
    return run.load_checkpoint(run.checkpoints / "step-00000010")


def test_switches_are_off_by_default_and_validated():
    assert DistillConfig().compile is False and DistillConfig().channels_last is False
    for key in ("compile", "channels_last"):
        with pytest.raises(ConfigError, match=f"config {key}=1: must be true or false"):
            load_config(None, [f"{key}=1"])
        with pytest.raises(ConfigError, match=f"config {key}='yes': must be true or false"):
            DistillConfig(**{key: "yes"}).validate()
        assert getattr(load_config(None, [f"{key}=true"]), key) is True


def test_channels_last_trains_like_eager(setup, tmp_path):
    eager = distill(tiny_config(setup), tmp_path / "eager")
    cl = distill(tiny_config(setup, channels_last=True), tmp_path / "cl")
    assert cl.trainer.generator_module.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert_losses_close(eager, cl)
    a, b = final_state(eager), final_state(cl)
    for key in ("generator", "ema", "critic"):
        assert list(a[key]) == list(b[key])
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], **WEIGHTS)
    UNet2DModel.from_pretrained(cl.student)  # its student saves and loads like any other


def test_compiled_trainer_trains_like_eager_keeps_plain_keys_resumes_and_exports(setup, tmp_path):
    torch._dynamo.reset()
    eager = distill(tiny_config(setup), tmp_path / "eager")
    assert graphs() == 0  # the switch off compiles nothing

    # No recompiles once every pass has run: the first TTUR cycle compiles, the next two add no graph.
    tr = DMD2Trainer(tiny_config(setup, compile=True))
    for _ in range(5):
        tr.train_step()
    warm = graphs()
    assert warm > 0
    for _ in range(10):
        tr.train_step()
    assert graphs() == warm, "recompiled after the first TTUR cycle"

    compiled = distill(tiny_config(setup, compile=True), tmp_path / "compiled")
    assert_losses_close(eager, compiled)
    a, b = final_state(eager), final_state(compiled)
    for key in ("generator", "ema", "critic", "opt_g", "opt_c"):
        assert list(a[key]) == list(b[key]), key  # the same keys, none with _orig_mod.
    for key in ("generator", "ema", "critic"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], **WEIGHTS)
    # The EMA tracks the compiled generator's parameters: it moved from the teacher, and is not the raw weights.
    teacher = UNet2DModel.from_pretrained(setup[0]).state_dict()
    assert not torch.equal(b["ema"]["conv_in.weight"], teacher["conv_in.weight"])
    assert not torch.equal(b["ema"]["conv_in.weight"], b["generator"]["conv_in.weight"])

    # Resume: a compiled run stopped at step 5 and resumed reproduces the straight compiled run.
    distill(tiny_config(setup, compile=True), tmp_path / "split", stop_after=5)
    resumed = distill(tiny_config(setup, compile=True), tmp_path / "split", resume=True)
    c = final_state(resumed)
    assert torch.equal(c["rng"], b["rng"])
    for key in ("generator", "ema", "critic"):
        assert list(c[key]) == list(b[key])
        for name in b[key]:
            torch.testing.assert_close(c[key][name], b[key][name], rtol=1e-5, atol=1e-6)

    # The student loads in plain diffusers, with the eager student's keys and (nearly) its outputs.
    plain, ours = UNet2DModel.from_pretrained(eager.student), UNet2DModel.from_pretrained(compiled.student)
    assert list(ours.state_dict()) == list(plain.state_dict())
    x, t, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 999), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, class_labels=labels).sample, plain(x, t, class_labels=labels).sample,
                                   rtol=1e-3, atol=1e-3)
