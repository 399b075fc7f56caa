"""Rectified-flow teachers on the pixel family: the schedule, its sampler against diffusers' Euler scheduler,
the teacher trainer's flow objective, and DMD2 from a flow teacher (1-step, 4-step with backward simulation)."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dmd2 import registry
from dmd2.families.base import ModelLoadError
from dmd2.families.pixel import PixelFamily, load_pixel_unet, read_schedule
from dmd2.sampling import ddim_sample, initial_noise, student_sample
from dmd2.schedule import FlowSchedule, NoiseSchedule, shift_sigmas, student_timesteps
from training.config import ConfigError, DistillConfig
from training.teacher import main as teacher_main
from training.teacher import train_teacher
from training.trainer import DMD2Trainer as Trainer

from conftest import TINY_UNET, make_two_class_folder


def _x0_noise(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randn(n, 1, 8, 8, generator=g)


# --- the schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_schedule_is_a_straight_line_from_data_to_noise(shift):
    s = FlowSchedule(shift)
    t = torch.arange(1000)
    a, sig = s.alpha_sigma(t)
    torch.testing.assert_close(a + sig, torch.ones(1000))
    assert sig[-1] == 1 and (sig[1:] > sig[:-1]).all()     # t = 999 is pure noise; noisier with t
    x0, eps = _x0_noise()
    torch.testing.assert_close(s.add_noise(x0, eps, torch.full((4,), 999)), eps)


def test_the_shift_moves_every_timestep_towards_noise_as_sd3_does():
    u = torch.linspace(0.001, 1, 50)
    shifted = shift_sigmas(u, 3.0)
    assert (shifted >= u).all() and shifted[-1] == 1
    torch.testing.assert_close(shift_sigmas(u, 1.0), u)
    # 4-step student timesteps follow the teacher's shifted schedule: sigma(749) = 3 * 0.75 / (1 + 2 * 0.75)
    sig = FlowSchedule(3.0).sigma(torch.tensor(student_timesteps(4)))
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.9, 0.75, 0.5]))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampling_grid_and_network_timesteps_match_diffusers_flow_match_euler(shift):
    steps = 7
    ours = FlowSchedule(shift)
    ts = torch.tensor(ours.sampling_timesteps(steps))
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist())
    torch.testing.assert_close(ours.sigma(ts), ref.sigmas[:-1])
    torch.testing.assert_close(ours.model_timestep(ts), ref.timesteps)


@pytest.mark.parametrize("t", [0, 10, 500, 990, 999])
def test_flow_velocity_round_trips_to_x0_and_eps_everywhere(t):
    s = FlowSchedule(3.0)
    x0, eps = _x0_noise()
    tt = torch.full((4,), t)
    x_t = s.add_noise(x0, eps, tt)
    u = s.target(x0, eps, tt, "flow")
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(s.to_x0(x_t, u, tt, "flow"), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.x0_to_eps(x_t, x0, tt), eps, atol=1e-4, rtol=0)


def test_bad_shift_is_refused():
    for bad in (0, -1.0, float("nan"), "3"):
        with pytest.raises(ValueError, match="shift"):
            FlowSchedule(bad)


# --- the sampler ----------------------------------------------------------------------------------
@pytest.fixture
def flow_family():
    return PixelFamily(num_classes=3, image_size=8, channels=1, schedule=FlowSchedule(2.0))


@pytest.fixture
def flow_unet(flow_family):
    torch.manual_seed(0)
    return flow_family.new_unet(**TINY_UNET).eval()


def test_teacher_sampler_is_diffusers_flow_match_euler(flow_family, flow_unet):
    """ddim_sample in (alpha, sigma) form on a flow schedule = FlowMatchEulerDiscreteScheduler's Euler steps,
    with the network fed sigma * 1000 as the diffusers pipelines feed it."""
    steps, labels = 6, [0, 1, 2, 1]
    noise = initial_noise(flow_family, 4, seed=3)
    ours = ddim_sample(flow_family, flow_unet, flow_family.condition(labels), noise, steps=steps)
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0)
    ref.set_timesteps(sigmas=torch.linspace(1, 1 / steps, steps).tolist())
    x = noise.clone()
    with torch.no_grad():
        for t in ref.timesteps:
            u = flow_unet(x, t.expand(4), class_labels=torch.tensor(labels)).sample
            x = ref.step(u, t, x).prev_sample
    print("max |ours - diffusers|:", (ours - x).abs().max().item())
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=0)


def test_cfg_on_a_flow_teacher_guides_the_velocity(flow_family, flow_unet):
    """CFG on x0 equals CFG on the velocity (x0 is affine in u at fixed x_t, t)."""
    x_t = initial_noise(flow_family, 2, seed=1)
    t, w = torch.tensor([600, 600]), 2.5
    cond, null = flow_family.condition([0, 2]), flow_family.null_condition(2)
    with torch.no_grad():
        u_c, u_u = (flow_family.model_output(flow_unet, x_t, t, c) for c in (cond, null))
        expected = flow_family.schedule.to_x0(x_t, u_u + w * (u_c - u_u), t, "flow")
        got = flow_family.denoise(flow_unet, x_t, 600, cond, w)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --- model folders --------------------------------------------------------------------------------
def test_a_saved_flow_model_loads_with_its_schedule(flow_family, flow_unet, tmp_path):
    flow_family.save_student(flow_unet, tmp_path / "m", timesteps=[999])
    cfg = json.loads((tmp_path / "m" / "scheduler_config.json").read_text())
    assert cfg == {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 2.0}
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "m").config.shift == 2.0  # plain diffusers
    family = PixelFamily.from_unet(load_pixel_unet(tmp_path / "m"), tmp_path / "m")
    assert family.schedule.kind == "flow" and family.schedule.shift == 2.0 and family.prediction_type == "flow"
    model = registry.LoadedModel(registry.spec_for(str(tmp_path / "m")))
    assert model.family.prediction_type == "flow"
    assert model.generate([0, 1], seed=0).images.shape == (2, 8, 8, 1)


def test_a_folder_without_scheduler_config_is_the_ddpm_default(tmp_path):
    schedule = read_schedule(tmp_path)
    assert isinstance(schedule, NoiseSchedule) and schedule.kind == "cosine"


@pytest.mark.parametrize("text, message", [
    ("{not json", "cannot read"),
    ('{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -2}', "unsupported schedule"),
    ('{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}', "unsupported schedule"),
    ('{"_class_name": "DDIMScheduler", "prediction_type": "epsilon"}', "predict v"),
])
def test_a_bad_scheduler_config_names_the_file(tmp_path, text, message):
    (tmp_path / "scheduler_config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=message) as e:
        read_schedule(tmp_path)
    assert "scheduler_config.json" in str(e.value)


# --- the teacher trainer --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory):
    """A tiny flow teacher trained for 40 steps on 'left'/'right' half-bright 16x16 images."""
    base = tmp_path_factory.mktemp("flow-teacher")
    make_two_class_folder(base / "images")
    out = train_teacher(data=str(base / "images"), out=str(base / "out"), steps=40, batch_size=16, lr=3e-3,
                        warmup=1, image_size=16, block_out_channels=(8, 16), log_every=1, save_every=1000,
                        seed=0, objective="flow")
    return out, base / "images"


def test_flow_teacher_learns_the_classes_and_records_its_objective(flow_teacher):
    out, _ = flow_teacher
    facts = json.loads((out / "training.json").read_text())
    assert facts["objective"] == "flow" and facts["flow_shift"] == 1.0
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    unet = load_pixel_unet(out)
    family = PixelFamily.from_unet(unet, out)
    assert family.schedule.kind == "flow"
    noise = initial_noise(family, 4, seed=0)
    left = ddim_sample(family, unet, family.condition([0] * 4), noise, steps=8)
    right = ddim_sample(family, unet, family.condition([1] * 4), noise, steps=8)
    assert left[..., :8].mean() - left[..., 8:].mean() > 0.5
    assert right[..., 8:].mean() - right[..., :8].mean() > 0.5


def test_teacher_cli_refuses_a_bad_objective_and_shift(capsys):
    for argv, message in ((["--objective", "edm"], "invalid choice"), (["--flow-shift", "0"], "--flow-shift")):
        with pytest.raises(SystemExit):
            teacher_main(argv)
        assert message in capsys.readouterr().err


# --- DMD2 from a flow teacher ---------------------------------------------------------------------
def _config(flow_teacher, **overrides) -> DistillConfig:
    teacher, data = flow_teacher
    base = dict(teacher=str(teacher), data=str(data), batch_size=4, iterations=2, ttur=2, warmup_steps=1,
                log_every=1, sample_every=0, eval_every=0, checkpoint_every=0, mixed_precision="no",
                generator_lr=1e-3, critic_lr=1e-3)
    base.update(overrides)
    return DistillConfig(**base).validate()


@pytest.mark.parametrize("steps", [1, 4])
def test_dmd2_from_a_flow_teacher_trains_and_exports_a_flow_student(flow_teacher, tmp_path, steps):
    trainer = Trainer(_config(flow_teacher, student_steps=steps, backward_simulation=True))
    before = {k: v.clone() for k, v in trainer.student().state_dict().items()}
    for _ in range(2):
        logs = trainer.train_step()
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values() if isinstance(v, float)), logs
    after = trainer.student().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.family.save_student(trainer.student(), tmp_path / "s", **trainer.student_meta())
    meta = json.loads((tmp_path / "s" / "dmd2.json").read_text())
    assert meta["schedule"] == "flow" and meta["flow_shift"] == 1.0 and meta["timesteps"] == student_timesteps(steps)
    model = registry.LoadedModel(registry.spec_for(str(tmp_path / "s")))
    assert model.family.schedule.kind == "flow"
    out = model.generate([0, 1], seed=0)
    assert out.nfe == steps and out.images.shape == (2, 16, 16, 1)


def test_flow_shift_in_the_config_moves_the_students_sigmas(flow_teacher, tmp_path):
    trainer = Trainer(_config(flow_teacher, student_steps=4, flow_shift=3.0))
    assert trainer.family.schedule.shift == 3.0
    torch.testing.assert_close(trainer.family.schedule.sigma(torch.tensor(trainer.timesteps)),
                               torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert trainer.student_meta()["flow_shift"] == 3.0
    # the student's folder carries the shift it was trained with, so it samples at those sigmas
    trainer.family.save_student(trainer.student(), tmp_path / "s", **trainer.student_meta())
    assert registry.LoadedModel(registry.spec_for(str(tmp_path / "s"))).family.schedule.shift == 3.0


def test_flow_shift_is_refused_for_a_ddpm_teacher(tmp_path, family):
    torch.manual_seed(0)
    family.save_student(family.new_unet(**TINY_UNET), tmp_path / "teacher")
    data = make_two_class_folder(tmp_path / "images")
    cfg = DistillConfig(teacher=str(tmp_path / "teacher"), data=str(data), batch_size=4, iterations=1,
                        mixed_precision="no", eval_every=0, sample_every=0, flow_shift=3.0).validate()
    with pytest.raises(ConfigError, match="not a flow model"):
        Trainer(cfg)
    with pytest.raises(ConfigError, match="flow_shift"):
        DistillConfig(flow_shift=0).validate()


def test_student_sampler_renoises_along_the_flow_line(flow_family, flow_unet):
    """Between student steps the x0 estimate is re-noised as (1 - s) x0 + s eps at the next timestep's s."""
    seen = []
    noise = initial_noise(flow_family, 2, seed=0)
    student_sample(flow_family, flow_unet, flow_family.condition([0, 1]), noise, [999, 499], seed=5,
                   on_step=lambda i, t, x0: seen.append(x0))
    fresh = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    s = flow_family.schedule.sigma(torch.tensor(499))
    x_499 = (1 - s) * seen[0] + s * fresh
    torch.testing.assert_close(seen[1], flow_family.denoise(flow_unet, x_499, 499, flow_family.condition([0, 1])),
                               atol=1e-5, rtol=0)
