"""A deeper generator than the teacher (generator_layers_per_block): it starts as the teacher, trains its added
layers, and saves as a plain student folder."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_UNET, make_two_class_folder, tiny_distill_config
from dmd2.families.pixel import load_pixel_unet
from training.config import ConfigError, DistillConfig
from training.deepen import deepen, teacher_key, without_added_layers
from training.distill import distill
from training.export import export_checkpoint
from training.runs import Run, RunError
from training.trainer import DMD2Trainer


def forward(unet, x, t, c):
    with torch.no_grad():
        return unet(x, t, class_labels=c).sample


@pytest.mark.parametrize("teacher_layers, layers", [(1, 2), (1, 3), (2, 3), (2, 4)])
def test_a_deepened_teacher_computes_what_the_teacher_computes(family, teacher_layers, layers):
    torch.manual_seed(0)
    teacher = family.new_unet(**dict(TINY_UNET, layers_per_block=teacher_layers))
    with torch.no_grad():  # make every weight matter: no zero-initialised layer left in the teacher
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    deep = deepen(teacher, layers).eval()
    assert deep.config.layers_per_block == layers
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in teacher.parameters())
    x, t, c = torch.randn(6, 1, 8, 8), torch.tensor([0, 100, 400, 700, 900, 999]), torch.tensor([0, 1, 2, 3, 0, 1])
    want = forward(teacher.eval(), x, t, c)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(forward(deep, x, t, c), want, rtol=0, atol=1e-5)


def test_the_added_layers_are_not_dead_after_a_step(family):
    """Zero last layers are identities, but their gradient is not zero: one optimiser step makes the deepened
    network compute something the teacher does not."""
    torch.manual_seed(0)
    teacher = family.new_unet(**TINY_UNET)
    deep = deepen(teacher, 2).train().requires_grad_(True)
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([10, 300, 600, 999]), torch.tensor([0, 1, 2, 3])
    deep(x, t, class_labels=c).sample.square().mean().backward()
    added = [name for name, p in deep.named_parameters()
             if teacher_key(name, 1, 2) is None and p.grad is not None and p.grad.abs().sum() > 0]
    assert any(".conv2." in n for n in added) and any("to_out" in n for n in added)
    before = forward(deep.eval(), x, t, c)
    torch.optim.SGD(deep.parameters(), lr=0.1).step()
    after, plain = forward(deep, x, t, c), forward(without_added_layers(deep, 1), x, t, c)
    assert (after - before).abs().max() > 1e-4
    assert (after - plain).abs().max() > 1e-4   # the added layers now contribute


def test_which_teacher_weight_each_layer_starts_from():
    # down layers keep their index; up layer 0 is the teacher's 0, the next (layers - teacher_layers) are new,
    # then the teacher's 1.. in order
    assert teacher_key("down_blocks.0.resnets.0.conv1.weight", 1, 3) == "down_blocks.0.resnets.0.conv1.weight"
    assert teacher_key("down_blocks.0.resnets.2.conv1.weight", 1, 3) is None
    assert teacher_key("up_blocks.1.attentions.0.to_q.weight", 1, 3) == "up_blocks.1.attentions.0.to_q.weight"
    assert teacher_key("up_blocks.1.resnets.2.conv1.weight", 1, 3) is None
    assert teacher_key("up_blocks.1.resnets.3.conv1.weight", 1, 3) == "up_blocks.1.resnets.1.conv1.weight"
    assert teacher_key("mid_block.resnets.0.conv1.weight", 1, 3) == "mid_block.resnets.0.conv1.weight"


def test_bad_depths_and_networks_are_refused_by_name(family):
    teacher = family.new_unet(**dict(TINY_UNET, layers_per_block=2))
    with pytest.raises(ValueError, match="layers_per_block=1.*above the teacher's 2"):
        deepen(teacher, 1)
    with pytest.raises(ValueError, match="layers_per_block=2.*above the teacher's 2"):
        deepen(teacher, 2)
    with pytest.raises(ValueError, match="plain UNet2DModel"):
        deepen(family.guidance_conditioned(teacher, 8), 3)
    # diffusers' Skip blocks scale their layers by 1/sqrt(2): an added layer would not start as an identity
    skip = family.new_unet(**dict(TINY_UNET, down_block_types=("DownBlock2D", "SkipDownBlock2D")))
    with pytest.raises(ValueError, match="SkipDownBlock2D blocks; deepening supports"):
        deepen(skip, 2)


def test_a_network_that_would_not_start_as_the_teacher_is_refused(family, monkeypatch):
    """The function check inside deepen: break the identity of the added layers and it must refuse."""
    import training.deepen as deepen_module

    monkeypatch.setattr(deepen_module, "_make_added_layers_identities", lambda *args: None)
    with pytest.raises(ValueError, match="does not start as the teacher"):
        deepen(family.new_unet(**TINY_UNET), 2)


def test_a_run_with_a_deeper_generator_trains_exports_and_resumes(setup, tmp_path):
    cfg = tiny_distill_config(setup, generator_layers_per_block=2, iterations=10)
    trainer = DMD2Trainer(cfg)
    assert trainer.generator.config.layers_per_block == 2
    assert trainer.critic.fake_unet.config.layers_per_block == 1          # the critic keeps the teacher's network
    distill(cfg, tmp_path / "run")
    student = load_pixel_unet(tmp_path / "run" / "student")
    assert student.config.layers_per_block == 2
    card = (tmp_path / "run" / "student" / "MODEL_CARD.md").read_text()
    assert "the teacher's with 2 layers per block" in card and "started as the teacher" in card
    # resume to 15 iterations; export step 0 (the start: the teacher's function) and the mean of two checkpoints
    distill(tiny_distill_config(setup, generator_layers_per_block=2, iterations=15), tmp_path / "run", resume=True)
    assert Run(tmp_path / "run").status()["step"] == 15
    export_checkpoint(tmp_path / "run", tmp_path / "start", step=0)
    teacher = load_pixel_unet(setup[0])
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 20]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(forward(load_pixel_unet(tmp_path / "start"), x, t, c), forward(teacher, x, t, c),
                               rtol=0, atol=1e-5)
    export_checkpoint(tmp_path / "run", tmp_path / "mean", step=[10, 15])
    assert load_pixel_unet(tmp_path / "mean").config.layers_per_block == 2
    with pytest.raises(RunError, match="layers_per_block"):   # the depth cannot change on resume
        distill(tiny_distill_config(setup, generator_layers_per_block=3, iterations=20), tmp_path / "run", resume=True)
    # a second run may start from it (same depth), and says what differs when the depth does not match
    distill(tiny_distill_config(setup, generator_layers_per_block=2, iterations=5,
                                generator_init=str(tmp_path / "run" / "student")), tmp_path / "run2")
    with pytest.raises(ConfigError, match="generator_init.*differs from the generator's"):
        DMD2Trainer(tiny_distill_config(setup, generator_init=str(tmp_path / "run" / "student")))


def test_a_deeper_fake_score_starts_as_the_teacher_and_trains(setup, tmp_path):
    cfg = tiny_distill_config(setup, critic_layers_per_block=2, iterations=10)
    trainer = DMD2Trainer(cfg)
    fake, teacher = trainer.critic.fake_unet, trainer.real_unet
    assert (fake.config.layers_per_block, trainer.generator.config.layers_per_block) == (2, 1)
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 20]), torch.tensor([0, 1, 2])
    torch.testing.assert_close(forward(fake.eval(), x, t, c), forward(teacher, x, t, c), rtol=0, atol=1e-5)
    assert all(p.requires_grad for p in fake.parameters())
    distill(cfg, tmp_path / "run")
    assert load_pixel_unet(tmp_path / "run" / "student").config.layers_per_block == 1   # the student: unchanged
    assert "the fake score had 2 layers per block" in (tmp_path / "run" / "student" / "MODEL_CARD.md").read_text()
    state = Run(tmp_path / "run").load_checkpoint()   # the latest, read as a resume reads it
    assert "fake_unet.down_blocks.0.resnets.1.conv2.weight" in state["critic"]   # checkpointed, so it resumes
    distill(tiny_distill_config(setup, critic_layers_per_block=2, iterations=15), tmp_path / "run", resume=True)
    assert Run(tmp_path / "run").status()["step"] == 15


def test_under_fsdp_the_saved_student_has_the_generators_depth(setup, monkeypatch):
    """Under FSDP the student is rebuilt on rank 0 from gathered weights: it must be the deepened network."""
    from training import sharding

    trainer = DMD2Trainer(tiny_distill_config(setup, generator_layers_per_block=2))
    monkeypatch.setattr(trainer, "sharded", True)
    monkeypatch.setattr(sharding, "full_model_state", lambda module: module.state_dict())
    student = trainer.full_student()
    assert student.config.layers_per_block == 2
    for key, value in trainer.generator.state_dict().items():
        assert torch.equal(student.state_dict()[key], value), key


@pytest.mark.parametrize("bad, match", [
    (dict(generator_layers_per_block=0), "generator_layers_per_block=0: must be null or an integer in 1..8"),
    (dict(generator_layers_per_block=True), "generator_layers_per_block=True"),
    (dict(generator_layers_per_block=2, guidance_range=[1.0, 3.0]), "not with guidance_range"),
    (dict(critic_layers_per_block=9), "critic_layers_per_block=9: must be null or an integer in 1..8"),
    (dict(critic_layers_per_block=2, guidance_range=[1.0, 3.0]), "critic_layers_per_block.*not with guidance_range"),
])
def test_bad_config_values_name_the_key(setup, bad, match):
    with pytest.raises(ConfigError, match=match):
        tiny_distill_config(setup, **bad)


def test_a_deeper_generator_is_for_the_pixel_family():
    with pytest.raises(ConfigError, match="generator_layers_per_block=2: deepening is for the pixel family"):
        DistillConfig(family="sd15", data="captions", eval_every=0, generator_layers_per_block=2).validate()


def test_a_depth_below_the_teachers_is_a_config_error(tmp_path, family):
    torch.manual_seed(0)
    family.save_student(family.new_unet(**dict(TINY_UNET, layers_per_block=2)), tmp_path / "teacher")
    setup = (tmp_path / "teacher", make_two_class_folder(tmp_path / "images"))
    with pytest.raises(ConfigError, match="generator_layers_per_block=1.*teacher's 2"):
        DMD2Trainer(tiny_distill_config(setup, generator_layers_per_block=1))


def test_the_added_layers_probe_reads_zero_at_the_start_and_more_after_a_step(family):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from added_layers import contribution

    torch.manual_seed(0)
    teacher = family.new_unet(**TINY_UNET).eval()
    deep = deepen(teacher, 2)
    fresh = contribution(deep, teacher, family, num=8)
    assert fresh["moved_from_start"] == 0 and fresh["added_layers"] == 0 and fresh["conv2_norm_added"] == 0
    deep.train().requires_grad_(True)
    x, t, c = torch.randn(4, 1, 8, 8), torch.tensor([999] * 4), torch.tensor([0, 1, 2, 3])
    deep(x, t, class_labels=c).sample.square().mean().backward()
    torch.optim.SGD(deep.parameters(), lr=0.1).step()
    moved = contribution(deep, teacher, family, num=8)
    assert 0 < moved["share"] and moved["added_layers"] > 0 and moved["conv2_norm_added"] > 0
    with pytest.raises(ValueError, match="nothing was added"):
        contribution(teacher, teacher, family, num=8)
