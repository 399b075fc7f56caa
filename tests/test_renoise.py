"""How a multi-step student moves between its steps (`renoise`): "fresh" re-noises each step's x0 estimate with fresh
noise (DMD2's sampler, the default), "ddim" takes DDIM's deterministic move. The sampler, a student's dmd2.json
naming its own, the CLI, the app's batcher, and training (backward simulation and the exported student)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_resumes_bit_identically, make_tiny_students, tiny_distill_config
from dmd2 import registry
from dmd2.__main__ import main
from dmd2.batching import Request, sample_batch
from dmd2.families.base import ModelLoadError
from dmd2.images import to_uint8
from dmd2.sampling import ddim_move, ddim_until, initial_noise, renoise_seed, student_sample
from training.config import ConfigError
from training.simulate import backward_simulate

TIMESTEPS = [999, 749, 499, 249]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(registry, "_cache", {})
    monkeypatch.setattr(registry, "_families", {})


def by_hand(family, unet, cond, x, timesteps):
    """DDIM's moves written out: x0 at each timestep, then alpha_next x0 + sigma_next eps(x, x0)."""
    sched = family.schedule
    for t, t_next in zip(timesteps, timesteps[1:] + [None]):
        x0 = family.denoise(unet, x, t, cond, 1.0).float()
        if t_next is None:
            return x0
        eps = (x - sched.alpha_sigma(torch.tensor(t))[0] * x0) / sched.alpha_sigma(torch.tensor(t))[1]
        a_next, s_next = sched.alpha_sigma(torch.tensor(t_next))
        x = a_next * x0 + s_next * eps


def test_ddim_moves_are_ddims_and_need_no_seed(family, unet):
    cond, z = family.condition(np.array([0, 1, 2])), initial_noise(family, 3, 0)
    ddim = student_sample(family, unet, cond, z, TIMESTEPS, seed=1, renoise="ddim")
    assert torch.allclose(ddim, by_hand(family, unet, cond, z, TIMESTEPS), atol=1e-5)
    assert torch.equal(ddim, student_sample(family, unet, cond, z, TIMESTEPS, seed=2, renoise="ddim"))  # no draw
    fresh = student_sample(family, unet, cond, z, TIMESTEPS, seed=1)                  # the default: DMD2's
    assert torch.equal(fresh, student_sample(family, unet, cond, z, TIMESTEPS, seed=1, renoise="fresh"))
    assert not torch.allclose(fresh, ddim)
    assert not torch.allclose(fresh, student_sample(family, unet, cond, z, TIMESTEPS, seed=2))   # fresh draws
    # one step: nothing to move between, both are the step's x0 estimate
    assert torch.equal(student_sample(family, unet, cond, z, [999], renoise="ddim"),
                       student_sample(family, unet, cond, z, [999]))


def test_the_first_ddim_move_keeps_about_the_starting_noise():
    """On the MNIST students' schedule, from t = 999 (almost all noise) the implied noise is about the starting noise,
    so the state at 749 is about alpha x0 + sigma z: what fresh re-noising gives only if it drew z again."""
    student = registry.load("mnist-dmd2-2step")
    fam, labels = student.family, np.arange(20) % 10
    cond, z = fam.condition(labels), initial_noise(fam, 20, 0)
    with torch.no_grad():
        x0 = fam.denoise(student.unet, z, 999, cond, 1.0).float()
    a, s = fam.schedule.alpha_sigma(torch.tensor(749))
    kept = (ddim_move(fam.schedule, z, x0, 999, 749) - a * x0) / s     # the noise in the moved state
    assert torch.corrcoef(torch.stack([kept.flatten(), z.flatten()]))[0, 1] > 0.99
    assert (kept - z).abs().max() < 0.1


def test_ddim_moves_on_a_flow_schedule_are_euler_steps(make_unet):
    from dmd2.families import PixelFamily
    from dmd2.schedule import FlowSchedule

    fam = PixelFamily(num_classes=3, image_size=8, channels=1, schedule=FlowSchedule(3.0))
    torch.manual_seed(0)
    unet = make_unet(0)
    cond, z = fam.condition(np.array([0, 1, 2])), initial_noise(fam, 3, 0)
    got = student_sample(fam, unet, cond, z, [999, 499], renoise="ddim")
    x0 = fam.denoise(unet, z, 999, cond, 1.0).float()
    s_from, s_to = fam.schedule.alpha_sigma(torch.tensor(999))[1], fam.schedule.alpha_sigma(torch.tensor(499))[1]
    u = (z - x0) / s_from                                     # the velocity the x0 estimate implies (x = x0 + s u)
    x = z + (s_to - s_from) * u                                # Euler from sigma(999) to sigma(499)
    assert torch.allclose(got, fam.denoise(unet, x, 499, cond, 1.0).float(), atol=1e-5)


def test_an_unknown_move_is_refused(family, unet):
    cond, z = family.condition(np.array([0])), initial_noise(family, 1, 0)
    with pytest.raises(ValueError, match="renoise must be one of fresh, ddim or a number in \\[0, 1\\], got 'sde'"):
        student_sample(family, unet, cond, z, TIMESTEPS, renoise="sde")
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="the fraction of fresh noise, in \\[0, 1\\]"):
            student_sample(family, unet, cond, z, TIMESTEPS, renoise=bad)
    with pytest.raises(ValueError, match="got True"):
        student_sample(family, unet, cond, z, TIMESTEPS, renoise=True)


def test_a_fraction_of_fresh_noise_mixes_the_two_moves(family, unet):
    """f in (0, 1): x_next = alpha_next x0 + sigma_next (sqrt(1 - f^2) eps + f z), z drawn as fresh draws it; 0 and
    1 are ddim and fresh themselves."""
    cond, z = family.condition(np.array([0, 1, 2])), initial_noise(family, 3, 0)
    for f, name in ((0, "ddim"), (1, "fresh"), (0.0, "ddim"), (1.0, "fresh")):
        assert torch.equal(student_sample(family, unet, cond, z, TIMESTEPS[:2], seed=4, renoise=f),
                           student_sample(family, unet, cond, z, TIMESTEPS[:2], seed=4, renoise=name))
    got = student_sample(family, unet, cond, z, TIMESTEPS[:2], seed=4, renoise=0.6)
    x0 = family.denoise(unet, z, 999, cond, 1.0).float()
    a, s = family.schedule.alpha_sigma(torch.tensor(999))
    eps = (z - a * x0) / s
    drawn = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))   # fresh's first draw from seed 4
    a2, s2 = family.schedule.alpha_sigma(torch.tensor(749))
    x = a2 * x0 + s2 * (0.8 * eps + 0.6 * drawn)
    assert torch.allclose(got, family.denoise(unet, x, 749, cond, 1.0).float(), atol=1e-5)


def test_a_students_dmd2_json_names_its_sampler(tmp_path):
    """A student trained with renoise: ddim samples that way everywhere (generate, the app's batcher); generate's
    `renoise` overrides it; a bad value in dmd2.json fails the load, naming the file."""
    _, two_step = make_tiny_students(tmp_path)
    meta = json.loads((tmp_path / "tiny-2step" / "dmd2.json").read_text())
    shutil.copytree(two_step, tmp_path / "ddim")
    (tmp_path / "ddim" / "dmd2.json").write_text(json.dumps({**meta, "renoise": "ddim"}))
    plain, ddim = registry.load(two_step), registry.load(str(tmp_path / "ddim"))
    assert plain.renoise == "fresh" and ddim.renoise == "ddim"
    labels = [3, 1, 4]
    out = ddim.generate(labels, seed=5)
    cond, z = ddim.family.condition(np.array(labels)), initial_noise(ddim.family, 3, 5)
    want = student_sample(ddim.family, ddim.unet, cond, z, [999, 499], renoise="ddim")
    assert np.array_equal(out.images, to_uint8(ddim.family.decode(want)))
    assert out.extra["renoise"] == "ddim" and "renoise" not in plain.generate(labels, seed=5).extra
    # the override, both ways
    assert np.array_equal(ddim.generate(labels, seed=5, renoise="fresh").images, plain.generate(labels, seed=5).images)
    assert np.array_equal(plain.generate(labels, seed=5, renoise="ddim").images, out.images)
    fresh = student_sample(plain.family, plain.unet, cond, z, [999, 499], seed=renoise_seed(5))
    assert np.array_equal(plain.generate(labels, seed=5).images, to_uint8(plain.family.decode(fresh)))
    # the app's batcher: two requests in one batch get what each gets alone
    got = sample_batch([Request(ddim, labels, 5), Request(ddim, [0, 2], 6)])
    assert np.array_equal(got[0], out.images) and np.array_equal(got[1], ddim.generate([0, 2], seed=6).images)
    with pytest.raises(ValueError, match="renoise must be one of"):
        ddim.generate(labels, seed=5, renoise="DDIM")
    (tmp_path / "ddim" / "dmd2.json").write_text(json.dumps({**meta, "renoise": "euler"}))
    registry._cache.clear()
    with pytest.raises(ModelLoadError, match=r"dmd2.json: renoise must be one of fresh, ddim or a number in \[0, 1\], got 'euler'"):
        registry.load(str(tmp_path / "ddim"))


def test_scripts_that_sample_or_rewrite_students_keep_their_move(tmp_path):
    """average_weights keeps the `like` student's dmd2.json whole; mixed_steps (its own fresh-noise loop) refuses a
    student that moves by DDIM rather than sample it otherwise."""
    from test_assets import load_script

    _, two_step = make_tiny_students(tmp_path)
    meta = json.loads((tmp_path / "tiny-2step" / "dmd2.json").read_text())
    shutil.copytree(two_step, tmp_path / "ddim")
    (tmp_path / "ddim" / "dmd2.json").write_text(json.dumps({**meta, "renoise": "ddim"}))
    out = load_script("average_weights").average([two_step, str(tmp_path / "ddim")], tmp_path / "ddim",
                                                 tmp_path / "soup")
    assert json.loads((out / "dmd2.json").read_text()) == {"family": "pixel", **meta, "renoise": "ddim"}
    with pytest.raises(ValueError, match="moves between its steps by ddim .* mixed_steps re-noises with fresh noise"):
        load_script("mixed_steps").sample(str(tmp_path / "ddim"), num=2)


def test_a_teacher_takes_no_renoise():
    with pytest.raises(ValueError, match="renoise: only for students"):
        registry.load("mnist-teacher").generate([0], seed=0, steps=2, renoise="ddim")


def test_the_cli_samples_and_records_the_move(tmp_path):
    main(["sample", "--model", "mnist-dmd2-2step", "--renoise", "ddim", "--num", "4", "--out", str(tmp_path / "s.npz")])
    saved = np.load(tmp_path / "s.npz")
    student = registry.load("mnist-dmd2-2step")
    assert np.array_equal(saved["images"], student.generate(np.arange(4) % 10, seed=0, renoise="ddim").images)
    assert not np.array_equal(saved["images"], student.generate(np.arange(4) % 10, seed=0).images)
    assert json.loads(str(saved["options"])) == {"renoise": "ddim"}    # not mistaken for the student's own samples
    main(["evaluate", "--model", "mnist-dmd2-2step", "--renoise", "ddim", "--num", "20", "--json",
          str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["renoise"] == "ddim"
    main(["evaluate", "--model", "mnist-dmd2-2step", "--renoise", "0.5", "--num", "20", "--json",
          str(tmp_path / "half.json")])
    assert json.loads((tmp_path / "half.json").read_text())["renoise"] == 0.5
    main(["sample", "--model", "mnist-dmd2-2step", "--renoise", "0.5", "--num", "4", "--out", str(tmp_path / "h.npz")])
    assert np.array_equal(np.load(tmp_path / "h.npz")["images"],
                          student.generate(np.arange(4) % 10, seed=0, renoise=0.5).images)
    main(["sample", "--model", "mnist-dmd2-2step", "--renoise", "1", "--num", "4", "--out", str(tmp_path / "one.npz")])
    assert json.loads(str(np.load(tmp_path / "one.npz")["options"])) == {}      # 1 is fresh: the student's own
    main(["evaluate", "--model", "mnist-dmd2-2step", "--num", "20", "--json", str(tmp_path / "plain.json")])
    assert "renoise" not in json.loads((tmp_path / "plain.json").read_text())   # the student's own: fresh
    main(["evaluate", "--model", "mnist-dmd2-2step", "--renoise", "fresh", "--num", "20", "--json",
          str(tmp_path / "given.json")])
    assert json.loads((tmp_path / "given.json").read_text())["renoise"] == "fresh"   # given: recorded
    main(["sample", "--model", "mnist-dmd2-2step", "--renoise", "fresh", "--num", "4", "--out",
          str(tmp_path / "own.npz")])
    assert json.loads(str(np.load(tmp_path / "own.npz")["options"])) == {}     # its own move: its default samples


def test_handed_over_the_student_moves_by_ddim_from_the_teachers_state():
    student = registry.load("mnist-dmd2-4step-last")
    labels = np.arange(6) % 10
    out = student.generate(labels, seed=5, teacher_until=749, renoise="ddim")
    teacher = student.handover_teacher()
    z = initial_noise(student.family, 6, 5)
    x749 = ddim_until(teacher.family, teacher.unet, teacher.family.condition(labels), z, 749, 50, 1.0)
    x = student_sample(student.family, student.unet, student.family.condition(labels), x749, [749, 499, 249],
                       renoise="ddim")
    assert np.array_equal(out.images, to_uint8(student.family.decode(x))) and out.extra["renoise"] == "ddim"
    last = student.generate(labels, seed=5, teacher_until=249, renoise="ddim")   # one step left: no move
    assert "renoise" not in last.extra
    assert np.array_equal(last.images, student.generate(labels, seed=5, teacher_until=249).images)


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--model", "mnist-teacher", "--renoise", "ddim", "--num", "20"], "mnist-teacher is a teacher"),
    (["evaluate", "--model", "mnist-dmd2-1step", "--renoise", "ddim", "--num", "20"], "takes one step"),
    (["sample", "--model", "mnist-dmd2-1step", "--renoise", "ddim"], "--renoise: only for multi-step students"),
    (["grid", "--model", "mnist-teacher", "--renoise", "fresh"], "--renoise: only for multi-step students"),
    (["evaluate", "--model", "mnist-dmd2-4step-last", "--teacher-until", "249", "--renoise", "ddim", "--num", "20"],
     "the student then takes one step"),
])
def test_the_cli_refuses_renoise_without_steps_to_move_between(args, message, tmp_path, capsys, monkeypatch):
    import dmd2.__main__ as cli

    def no_sampling(*a, **k):
        raise AssertionError("sampled before refusing")
    monkeypatch.setattr(cli, "generate_many", no_sampling)
    with pytest.raises(SystemExit) as e:
        main([*args, *(["--out", str(tmp_path / "x.out")] if args[0] != "evaluate" else [])])
    assert e.value.code != 0 and message in capsys.readouterr().err


def test_the_cli_names_the_moves_it_knows(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--model", "mnist-dmd2-2step", "--renoise", "sde", "--out", str(tmp_path / "y.npz")])
    assert "--renoise: must be fresh, ddim or a number in [0, 1], got 'sde'" in capsys.readouterr().err
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit):
            main(["sample", "--model", "mnist-dmd2-2step", "--renoise", bad, "--out", str(tmp_path / "y.npz")])
        assert f"got '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "y.npz").exists()


# --- training ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(student_steps=2, renoise="sde"), "must be one of fresh, ddim"),
    (dict(renoise="ddim"), "a 1-step student has none"),
    (dict(student_steps=2, renoise="ddim", family="sdxl"), "ddim is built for pixel students"),
    (dict(student_steps=2, renoise="ddim", backward_simulation=False), "set backward_simulation: true"),
])
def test_config_refuses_bad_renoise(setup, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_distill_config(setup, **overrides)


def test_backward_simulation_moves_as_the_sampler_does(family, unet):
    cond, z = family.condition(np.array([0, 1, 2])), initial_noise(family, 3, 0)
    gen = torch.Generator().manual_seed(0)
    x = backward_simulate(family, unet, cond, TIMESTEPS, 3, z, gen, renoise="ddim")
    want = z
    for t, t_next in zip(TIMESTEPS[:3], TIMESTEPS[1:]):
        want = ddim_move(family.schedule, want, family.denoise(unet, want, t, cond).float(), t, t_next)
    assert torch.allclose(x, want, atol=1e-6)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())    # nothing drawn
    fresh = backward_simulate(family, unet, cond, TIMESTEPS, 3, z, torch.Generator().manual_seed(0))
    assert not torch.allclose(fresh, x)
    by_hand, g = z, torch.Generator().manual_seed(0)      # fresh: DMD2's re-noising, draw for draw
    for t, t_next in zip(TIMESTEPS[:3], TIMESTEPS[1:]):
        x0 = family.denoise(unet, by_hand, t, cond)
        by_hand = family.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([t_next]))
    assert torch.equal(fresh, by_hand)
    half_gen = torch.Generator().manual_seed(0)            # a fraction draws fresh noise and lands between the two
    half = backward_simulate(family, unet, cond, TIMESTEPS, 3, z, half_gen, renoise=0.5)
    assert not torch.equal(half_gen.get_state(), torch.Generator().manual_seed(0).get_state())
    assert not torch.allclose(half, x) and not torch.allclose(half, fresh)
    # under bf16 autocast (training's mixed precision) the x0 estimates are bf16; the state stays fp32 and close
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = backward_simulate(family, unet, cond, TIMESTEPS, 3, z, gen, renoise="ddim")
    assert low.dtype == torch.float32 and (low - x).abs().max() < 0.1


def test_a_ddim_trained_student_records_and_samples_its_move(setup, tmp_path, monkeypatch):
    from training import trainer as trainer_module
    from training.distill import distill

    checked = []
    real_input = trainer_module.generator_input
    def checking(fam, generator, cond, n, timesteps, gen, device, *args, **kwargs):
        """The input the trainer gets at step k = 1 (step_weights [0, 1]) is DDIM's move from the generator's
        own first step, redone here by hand from the same draws."""
        replay = torch.Generator().set_state(gen.get_state())
        x_t, t = real_input(fam, generator, cond, n, timesteps, gen, device, *args, **kwargs)
        torch.multinomial(torch.tensor([0.0, 1.0], dtype=torch.float64), 1, generator=replay)   # k
        noise = torch.randn(fam.latent_shape(n), generator=replay)
        with torch.no_grad():
            x0 = fam.denoise(generator, noise, timesteps[0], cond).float()
        assert int(t[0]) == timesteps[1] and torch.allclose(x_t, ddim_move(fam.schedule, noise, x0, *timesteps[:2]),
                                                            atol=1e-5)
        checked.append(int(t[0]))
        return x_t, t
    monkeypatch.setattr(trainer_module, "generator_input", checking)
    cfg = tiny_distill_config(setup, student_steps=2, renoise="ddim", sample_every=5, step_weights=[0, 1])
    run = distill(cfg, tmp_path / "run")
    assert len(checked) == 10 + 2                               # every critic and generator input
    student = tmp_path / "run" / "student"
    assert json.loads((student / "dmd2.json").read_text())["renoise"] == "ddim"
    assert "- between steps: ddim moves (renoise: ddim" in (student / "MODEL_CARD.md").read_text()
    model = registry.LoadedModel(registry.spec_for(str(student)))
    assert model.renoise == "ddim"
    labels = [0, 1]
    cond, z = model.family.condition(np.array(labels)), initial_noise(model.family, 2, 3)
    want = student_sample(model.family, model.unet, cond, z, list(model.timesteps), renoise="ddim")
    assert np.array_equal(model.generate(labels, seed=3).images, to_uint8(model.family.decode(want)))
    # the trainer's own samples (grids, quick evaluations) move the same way
    got = run.trainer.sample(labels, seed=3)
    noise = torch.randn(run.trainer.family.latent_shape(2), generator=torch.Generator().manual_seed(3))
    by_ddim = student_sample(run.trainer.family, run.trainer.student(), run.trainer.family.condition(labels), noise,
                             run.trainer.timesteps, renoise="ddim")
    assert torch.allclose(got, run.trainer.family.decode(by_ddim))
    # a fresh-noise run records nothing (old students' dmd2.json stay as they were)
    monkeypatch.setattr(trainer_module, "generator_input", real_input)
    distill(tiny_distill_config(setup, student_steps=2), tmp_path / "plain")
    assert "renoise" not in json.loads((tmp_path / "plain" / "student" / "dmd2.json").read_text())
    assert "between steps" not in (tmp_path / "plain" / "student" / "MODEL_CARD.md").read_text()


def test_a_ddim_run_resumes_bit_identically(setup, tmp_path):
    assert_resumes_bit_identically(tiny_distill_config(setup, student_steps=2, renoise="ddim"), tmp_path, 5)
