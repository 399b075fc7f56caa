"""The DMD2 trainer on a tiny teacher: which parameters move when, TTUR, backward simulation,
exact resume (in-process and after kill -9), NaN handling, ablation switches and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_UNET, make_two_class_folder, tiny_distill_config
from dmd2.families.pixel import load_pixel_unet
from training.config import ConfigError, DistillConfig, load_config
from training.distill import distill
from training.trainer import DMD2Trainer, NonFiniteLoss
from training.runs import Run, RunError, safe_run_dir
from training.simulate import backward_simulate, generator_input

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup(tmp_path, family):
    """A tiny random teacher saved in diffusers format and a two-class image folder."""
    torch.manual_seed(0)
    teacher = family.new_unet(**TINY_UNET)
    family.save_student(teacher, tmp_path / "teacher")
    data = make_two_class_folder(tmp_path / "images")
    return tmp_path / "teacher", data


tiny_config = tiny_distill_config


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_each_step_moves_only_its_own_parameters(setup):
    tr = DMD2Trainer(tiny_config(setup))
    real, cond = tr.real_batch()
    g, c, e, t = (snapshot(m) for m in (tr.generator_module, tr.critic_module, tr.ema, tr.real_unet))

    stats = tr.critic_step(real, cond)
    assert changed(c, tr.critic_module)
    assert not changed(g, tr.generator_module) and not changed(e, tr.ema) and not changed(t, tr.real_unet)
    assert set(stats) >= {"critic/fake_denoise", "critic/gan_critic"}
    assert not any(k.startswith("generator/") for k in stats)

    c = snapshot(tr.critic_module)
    stats = tr.generator_step(real, cond)
    assert changed(g, tr.generator_module) and changed(e, tr.ema)
    assert not changed(c, tr.critic_module) and not changed(t, tr.real_unet)
    assert set(stats) >= {"generator/dm", "generator/gan_generator"}
    # The critic was frozen during the generator step: no weight gradients were even computed.
    assert all(p.grad is None for p in tr.critic_module.parameters())
    assert all(p.requires_grad for p in tr.critic_module.parameters())


def test_ttur_runs_the_critic_five_times_per_generator_update(setup):
    tr = DMD2Trainer(tiny_config(setup, ttur=5))
    kinds = []
    for _ in range(10):
        stats = tr.train_step()
        kinds.append(("C" if "critic/fake_denoise" in stats else "") + ("G" if "generator/dm" in stats else ""))
    assert kinds == ["C", "C", "C", "C", "CG"] * 2
    assert tr.generator_updates == 2
    assert tr.opt_c.state_dict()["state"][0]["step"].item() == 10
    assert tr.opt_g.state_dict()["state"][0]["step"].item() == 2


def test_ablation_switches_remove_their_losses(setup):
    no_gan = DMD2Trainer(tiny_config(setup, gan_generator_weight=0.0, gan_critic_weight=0.0, ttur=1))
    assert no_gan.critic_module.gan_head is None
    stats = no_gan.train_step()
    assert "critic/gan_critic" not in stats and "generator/gan_generator" not in stats and "generator/dm" in stats

    gan_only = DMD2Trainer(tiny_config(setup, dm_weight=0.0, ttur=1))
    stats = gan_only.train_step()
    assert "generator/dm" not in stats and "generator/gan_generator" in stats

    with pytest.raises(ConfigError, match="dm_weight"):
        tiny_config(setup, dm_weight=0.0, gan_generator_weight=0.0)


def test_backward_simulation_follows_the_generators_own_trajectory(setup, family):
    tr = DMD2Trainer(tiny_config(setup, student_steps=4))
    gen_net, fam, ts = tr.generator_module, tr.family, tr.timesteps
    assert ts == [999, 749, 499, 249]
    cond = fam.condition([0, 1, 0])
    noise = torch.randn(fam.latent_shape(3))

    rng = torch.Generator().manual_seed(7)
    got = backward_simulate(fam, gen_net, cond, ts, 2, noise, rng)
    # By hand: denoise at 999, re-noise to 749, denoise, re-noise to 499 (same fresh-noise draws).
    rng = torch.Generator().manual_seed(7)
    x = noise
    for i in range(2):
        x0 = fam.denoise(gen_net, x, ts[i], cond)
        x = fam.schedule.add_noise(x0, torch.randn(x0.shape, generator=rng), torch.tensor([ts[i + 1]]))
    assert torch.equal(got, x)

    # The input depends on the generator: a changed generator gives a different training input.
    with torch.no_grad():
        gen_net.conv_out.bias.add_(0.5)
    rng = torch.Generator().manual_seed(7)
    assert not torch.allclose(backward_simulate(fam, gen_net, cond, ts, 2, noise, rng), got)

    # Without backward simulation the input is a noised real image instead.
    real = torch.zeros(fam.latent_shape(3))
    seen = set()
    for seed in range(20):
        x_t, t = generator_input(fam, gen_net, cond, 3, ts, torch.Generator().manual_seed(seed), "cpu",
                                 backward_simulation=False, real_x0=real)
        seen.add(int(t[0]))
        assert x_t.shape == real.shape and (t == t[0]).all()
    assert seen == set(ts)  # k is drawn uniformly over the student's steps


def test_step_weights_choose_which_steps_are_trained(setup, family):
    tr = DMD2Trainer(tiny_config(setup, student_steps=4, step_weights=[0, 1, 0, 3]))
    fam, ts = tr.family, tr.timesteps
    cond = fam.condition([0, 1])
    counts = {t: 0 for t in ts}
    for seed in range(200):
        _, t = generator_input(fam, tr.generator_module, cond, 2, ts, torch.Generator().manual_seed(seed), "cpu",
                               step_weights=tr.cfg.step_weights)
        counts[int(t[0])] += 1
    assert counts[999] == counts[499] == 0  # weight 0: never trained
    assert 2 * counts[749] < counts[249]    # 1 : 3 (expected 50 : 150)

    for bad in ([1, 1], [1, -1, 1, 1], [0, 0, 0, 0], ["a", 1, 1, 1]):
        with pytest.raises(ConfigError, match="step_weights"):
            tiny_config(setup, student_steps=4, step_weights=bad)


def test_student_timesteps_set_where_each_step_starts_in_training_sampling_and_the_card(setup, family, tmp_path,
                                                                                       monkeypatch):
    """A 2-step student at t = 999, 749 (not the even 999, 499): training draws its inputs there, and the saved
    student samples, and its card reads, at those timesteps."""
    import training.trainer as trainer_module
    from dmd2 import registry
    from dmd2.images import to_uint8
    from dmd2.sampling import initial_noise, renoise_seed, student_sample

    drawn = []  # (the timesteps the trainer passed, the t each generator input was made at)
    real_input = trainer_module.generator_input
    def recording(fam, net, cond, n, timesteps, *args, **kwargs):
        x_t, t = real_input(fam, net, cond, n, timesteps, *args, **kwargs)
        drawn.append((list(timesteps), int(t[0])))
        return x_t, t
    monkeypatch.setattr(trainer_module, "generator_input", recording)
    cfg = tiny_config(setup, student_steps=2, student_timesteps=[999, 749], iterations=40, checkpoint_every=20)
    run = distill(cfg, tmp_path / "run")
    assert run.trainer.timesteps == [999, 749]
    assert len(drawn) == 40 + 8 and all(ts == [999, 749] for ts, _ in drawn)  # each critic and generator update
    assert {t for _, t in drawn} == {999, 749}  # both steps trained

    student = tmp_path / "run" / "student"
    assert json.loads((student / "dmd2.json").read_text())["timesteps"] == [999, 749]
    assert "timesteps: [999, 749]" in (student / "MODEL_CARD.md").read_text()
    model = registry.LoadedModel(registry.spec_for(str(student)))
    got = model.generate([1, 0], seed=3)
    assert model.timesteps == (999, 749) and got.extra["timesteps"] == [999, 749]
    # The app's sample is the one drawn by hand at 999 then 749, not the one at the default 999, 499.
    def by_hand(timesteps):
        noise = initial_noise(model.family, 2, 3)
        with torch.no_grad():
            x = student_sample(model.family, model.unet, model.family.condition([1, 0]), noise, timesteps,
                               seed=renoise_seed(3))
        return to_uint8(model.family.decode(x))
    assert (got.images == by_hand([999, 749])).all()
    assert not (got.images == by_hand([999, 499])).all()


@pytest.mark.parametrize("bad, message", [
    ([999, 999], "strictly decreasing"), ([999, 1000], "in 0..999"), ([999, -1], "in 0..999"),
    ([749, 499], "first step starts from pure noise"), (999, "list of integers"), ([999.0, 749], "list of integers"),
    ([True, 749], "list of integers"), ([], "at least one timestep"), ([999, 749, 499], "gives 3 timesteps"),
])
def test_student_timesteps_bad_values_are_refused_by_name(setup, bad, message):
    with pytest.raises(ConfigError, match=r"student_timesteps.*" + message):
        tiny_config(setup, student_steps=2, student_timesteps=bad)


def test_student_timesteps_and_first_timestep_are_not_both_set(setup):
    with pytest.raises(ConfigError, match="keep one of them"):
        tiny_config(setup, student_steps=1, student_timesteps=[499], first_timestep=399)
    assert DMD2Trainer(tiny_config(setup, student_timesteps=[499])).timesteps == [499]  # 1 step: any t


def test_student_timesteps_beyond_the_teachers_schedule_are_refused_by_name(setup):
    """validate() knows only 0..999; a teacher trained with fewer timesteps is checked when the trainer reads it."""
    config = setup[0] / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 500}))
    with pytest.raises(ConfigError, match=r"student_timesteps=\[749\]: this teacher has timesteps 0..499"):
        DMD2Trainer(tiny_config(setup, student_timesteps=[749]))
    assert DMD2Trainer(tiny_config(setup, student_timesteps=[499])).timesteps == [499]


def test_checkpoints_at_different_student_timesteps_are_not_averaged(setup, tmp_path):
    from training.export import export_checkpoint

    run = distill(tiny_config(setup, student_steps=2, iterations=10, checkpoint_every=5), tmp_path / "run")
    distill(tiny_config(setup, student_steps=2, student_timesteps=[999, 749], iterations=15, checkpoint_every=5),
            run.path, resume=True)
    with pytest.raises(RunError, match="different student_timesteps"):
        export_checkpoint(run.path, tmp_path / "mixed", step=[10, 15])
    assert json.loads((export_checkpoint(run.path, tmp_path / "s15", step=[15]) / "dmd2.json").read_text()
                      )["timesteps"] == [999, 749]


def test_per_step_critic_starts_as_the_teacher_and_learns_each_steps_outputs_apart(setup, family, tmp_path):
    tr = DMD2Trainer(tiny_config(setup, student_steps=4, critic_per_step=True))
    fam, critic = tr.family, tr.critic_module
    cond = fam.condition([0, 1])
    x, t = torch.randn(fam.latent_shape(2)), torch.tensor([500, 500])
    with torch.no_grad():
        teacher = fam.denoise(tr.real_unet, x, t, cond, guidance=1.0)
        for k in range(4):  # a zero step embedding: every step starts as the teacher's copy
            assert torch.equal(critic(x, t, cond, call="fake_x0", step=k), teacher)
    for step in (None, 4, True):
        with pytest.raises(ValueError, match="per student step"):
            critic(x, t, cond, call="fake_x0", step=step)

    # Only step 2 (index 1) is trained: only its embedding row moves, and the fake score then tells it apart.
    cfg = tiny_config(setup, student_steps=4, critic_per_step=True, step_weights=[0, 1, 0, 0], iterations=6)
    tr = DMD2Trainer(cfg)
    for _ in range(cfg.iterations):
        tr.train_step()
    emb = tr.critic_module.step_embedding.detach()
    assert emb[1].abs().sum() > 0 and emb[[0, 2, 3]].abs().sum() == 0
    with torch.no_grad():
        assert not torch.allclose(tr.critic_module(x, t, cond, call="fake_x0", step=1),
                                  tr.critic_module(x, t, cond, call="fake_x0", step=0))

    # Every critic call of both updates is told the step being trained.
    seen = []
    tr.critic_module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("step")), with_kwargs=True)
    tr.step = 4
    tr.train_step()  # a critic update and a generator update
    assert len(seen) >= 3 and set(seen) == {1}
    with torch.no_grad():  # the GAN head's verdict depends on the step too
        logits = [tr.critic_module(x, cond, t, torch.zeros_like(x), call="realism_logits", step=k) for k in (0, 1)]
    assert not torch.allclose(*logits)

    # A resume cannot switch the per-step critic on or off: a clear error, not a torch traceback.
    cfg = tiny_config(setup, student_steps=4, iterations=10, checkpoint_every=5)
    distill(cfg, tmp_path / "plain", stop_after=5)
    with pytest.raises(RunError, match="does not fit the config.*critic_per_step"):
        distill(tiny_config(setup, student_steps=4, iterations=10, checkpoint_every=5, critic_per_step=True),
                tmp_path / "plain", resume=True)

    # The embedding is part of the critic's checkpoint: a resumed run is still bit-identical.
    cfg = tiny_config(setup, student_steps=4, critic_per_step=True, iterations=10, checkpoint_every=5)
    straight = distill(cfg, tmp_path / "straight").trainer.state_dict()
    distill(cfg, tmp_path / "split", stop_after=5)
    resumed = distill(cfg, tmp_path / "split", resume=True).trainer.state_dict()
    assert "step_embedding" in resumed["critic"]
    for key in ("generator", "critic"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"

    with pytest.raises(ConfigError, match="critic_per_step"):
        tiny_config(setup, student_steps=1, critic_per_step=True)
    with pytest.raises(ConfigError, match="critic_per_step"):
        tiny_config(setup, student_steps=4, critic_per_step="yes")


def test_mean_state_dict_weighs_floats_and_keeps_the_rest_from_the_first():
    from training.export import mean_state_dict

    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.bfloat16), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([1.5], dtype=torch.bfloat16), "n": torch.tensor(7)}
    mean = mean_state_dict([a, b])
    assert torch.equal(mean["w"], torch.tensor([2.0, 4.0])) and mean["h"].dtype == torch.bfloat16
    assert mean["h"].item() == 1.0 and mean["n"].item() == 3  # integer entries (counters) from the first
    weighted = mean_state_dict(iter([a, b]), weights=[3, 1])  # normalised: 0.75 a + 0.25 b
    assert torch.equal(weighted["w"], torch.tensor([1.5, 3.0]))

    # Read once each, before the next is made: a model reloaded in place averages correctly.
    w = torch.zeros(2)

    def reloaded():
        for value in (1.0, 5.0):
            w.fill_(value)
            yield {"w": w}
    assert torch.equal(mean_state_dict(reloaded())["w"], torch.tensor([3.0, 3.0]))
    # Summed in float64: a float32 running sum would lose the two 1s next to 2**24.
    big = [{"w": torch.tensor([2.0 ** 24])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([1.0])}]
    assert mean_state_dict(big)["w"].item() == (2 ** 24 + 2) / 3

    with pytest.raises(ValueError, match="no state dict"):
        mean_state_dict([])
    with pytest.raises(ValueError, match="different entries or shapes"):
        mean_state_dict([a, {"w": a["w"]}])
    with pytest.raises(ValueError, match="different entries or shapes"):
        mean_state_dict([a, {**b, "w": torch.ones(3)}])
    with pytest.raises(ValueError, match="1 weights for more"):
        mean_state_dict([a, b], weights=[1])
    with pytest.raises(ValueError, match="3 weights for 2"):
        mean_state_dict([a, b], weights=[1, 1, 1])
    with pytest.raises(ValueError, match="sum to 0"):
        mean_state_dict([a, b], weights=[0, 0])
    for bad in ([1, -1], [1, float("nan")]):
        with pytest.raises(ValueError, match="finite and non-negative"):
            mean_state_dict([a, b], weights=bad)


def test_export_writes_the_ema_of_a_chosen_checkpoint_as_a_student(setup, family, tmp_path, monkeypatch):
    from training.export import export_checkpoint

    cfg = tiny_config(setup, iterations=10, checkpoint_every=5, keep_checkpoints=3)
    run = distill(cfg, tmp_path / "run")
    state5 = run.load_checkpoint(run.checkpoints / "step-00000005")
    out = export_checkpoint(run.path, tmp_path / "student-5", step=5)
    student = family.load_student(out)
    assert all(torch.equal(v, state5["ema"][k]) for k, v in student.state_dict().items())
    assert not torch.equal(state5["ema"]["conv_in.weight"], state5["generator"]["conv_in.weight"])  # EMA, not raw
    assert not torch.equal(state5["ema"]["conv_in.weight"], run.trainer.ema.state_dict()["conv_in.weight"])
    assert "checkpoint of step 5" in (out / "MODEL_CARD.md").read_text()
    assert "steps: 5 critic updates" in (out / "MODEL_CARD.md").read_text()
    latest = family.load_student(export_checkpoint(run.path, tmp_path / "student-latest"))  # default: step 10
    assert all(torch.equal(v, run.trainer.ema.state_dict()[k]) for k, v in latest.state_dict().items())

    # Several steps: the mean of their EMA weights, whatever order they are given in.
    state10 = run.load_checkpoint(run.checkpoints / "step-00000010")
    mean = family.load_student(export_checkpoint(run.path, tmp_path / "student-mean", step=[10, 5]))
    for k, v in mean.state_dict().items():
        torch.testing.assert_close(v, (state5["ema"][k] + state10["ema"][k]) / 2)
    assert not torch.equal(state5["ema"]["conv_in.weight"], state10["ema"]["conv_in.weight"])
    card = (tmp_path / "student-mean" / "MODEL_CARD.md").read_text()
    assert "mean of the weights of the checkpoints of steps 5, 10" in card and "steps: 10 critic updates" in card
    # Step 0: the weights the run started from (here the teacher; with generator_init that student).
    teacher = family.load_teacher(setup[0]).state_dict()
    start = family.load_student(export_checkpoint(run.path, tmp_path / "student-0-10", step=[0, 10]))
    for k, v in start.state_dict().items():
        torch.testing.assert_close(v, (teacher[k] + state10["ema"][k]) / 2)
    assert "step 0 is the weights it started from (the teacher)" in (tmp_path / "student-0-10" / "MODEL_CARD.md").read_text()
    shutil.copytree(out, tmp_path / "init")
    init_run = distill(tiny_config(setup, iterations=5, generator_init=str(tmp_path / "init")), tmp_path / "from-init")
    start = family.load_student(export_checkpoint(init_run.path, tmp_path / "init-0", step=0))
    assert all(torch.equal(v, state5["ema"][k]) for k, v in start.state_dict().items())
    shutil.rmtree(tmp_path / "init")
    with pytest.raises(RunError, match="step 0 is the weights the run started from, generator_init=.*init"):
        export_checkpoint(init_run.path, tmp_path / "init-0-again", step=[0, 5])
    later = family.load_student(export_checkpoint(init_run.path, tmp_path / "init-5", step=5))  # no step 0: fine
    assert later.state_dict()["conv_in.weight"].equal(init_run.trainer.ema.state_dict()["conv_in.weight"])
    with pytest.raises(RunError, match="step 5 is given more than once"):
        export_checkpoint(init_run.path, tmp_path / "twice", step=[5, 0, 5])

    with pytest.raises(RunError, match=r"no checkpoint of step 7; it has steps \[5, 10\]"):
        export_checkpoint(run.path, tmp_path / "x", step=7)
    with pytest.raises(RunError, match=r"no checkpoint of step 3, 7; it has steps \[5, 10\]"):
        export_checkpoint(run.path, tmp_path / "x", step=[5, 3, 7])
    assert not (tmp_path / "x").exists()
    with pytest.raises(RunError, match="already exists"):
        export_checkpoint(run.path, out, step=10)
    assert family.load_student(out).state_dict()["conv_in.weight"].equal(state5["ema"]["conv_in.weight"])  # kept
    with pytest.raises(RunError, match="not a run folder"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "y")
    (run.checkpoints / "step-00000005" / "state.pt").write_bytes(b"truncated")
    with pytest.raises(RunError, match="corrupt"):
        export_checkpoint(run.path, tmp_path / "z", step=5)
    assert not (tmp_path / "z").exists() and not (tmp_path / ".z.partial").exists()

    # A resume with changed values: older checkpoints are rebuilt with the config they were trained with.
    resumed = distill(tiny_config(setup, iterations=15, checkpoint_every=5, keep_checkpoints=3, critic_per_step=False,
                                  generator_lr=5e-4), run.path, resume=True)
    assert (resumed.path / "config.before-step-10.yaml").is_file()
    assert resumed.config_in_force(10).name == "config.before-step-10.yaml"
    assert resumed.config_in_force(15).name == "config.yaml"
    # Step 0 is where the run started, whatever a later resume's generator_init says.
    distill(tiny_config(setup, iterations=20, checkpoint_every=5, keep_checkpoints=3, critic_per_step=False,
                        generator_lr=5e-4, generator_init=str(tmp_path / "student-mean")), run.path, resume=True)
    start = family.load_student(export_checkpoint(run.path, tmp_path / "resumed-0", step=0))
    assert all(torch.equal(v, teacher[k]) for k, v in start.state_dict().items())
    # Checkpoints trained with different teachers (a resume changed it) are not averaged.
    before = resumed.path / "config.before-step-15.yaml"
    before.write_text(before.read_text().replace(f"teacher: {setup[0]}", "teacher: elsewhere"))
    with pytest.raises(RunError, match="different teacher"):
        export_checkpoint(run.path, tmp_path / "mixed", step=[15, 20])
    # A failure while writing leaves neither the student nor its temporary folder.
    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr("training.export.write_student_card", full_disk)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(run.path, tmp_path / "full", step=20)
    assert not (tmp_path / "full").exists() and not (tmp_path / ".full.partial").exists()


def test_resume_in_process_is_bit_identical(setup, tmp_path):
    cfg = tiny_config(setup, iterations=10, checkpoint_every=5)
    straight = distill(cfg, tmp_path / "straight").trainer.state_dict()
    distill(cfg, tmp_path / "split", stop_after=5)
    assert Run(tmp_path / "split").status()["state"] == "stopped"
    resumed = distill(cfg, tmp_path / "split", resume=True).trainer.state_dict()
    for key in ("generator", "ema", "critic"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    assert torch.equal(straight["rng"], resumed["rng"])
    steps = [r["step"] for r in Run(tmp_path / "split").metrics()]
    assert steps == list(range(1, 11))  # the log has each step once, none duplicated by the resume


def _cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "training", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_minus_nine_then_resume_matches_the_uninterrupted_run(setup, tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(json.dumps(tiny_config(setup, iterations=12, checkpoint_every=4, keep_checkpoints=5).to_dict()))
    straight = _cli(["distill", "--config", str(cfg_file), "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    victim = _cli(["distill", "--config", str(cfg_file), "--out", str(tmp_path / "killed")])
    first = tmp_path / "killed" / "checkpoints" / "step-00000004" / "state.pt"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert Run(tmp_path / "killed").status()["state"] == "running"  # died without a word
    resumed = _cli(["distill", "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()

    a = torch.load(tmp_path / "straight/checkpoints/step-00000012/state.pt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoints/step-00000012/state.pt", weights_only=True)
    for key in ("generator", "ema", "critic"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert Run(tmp_path / "killed").status()["state"] == "finished"
    s1 = load_pixel_unet(tmp_path / "straight/student")
    s2 = load_pixel_unet(tmp_path / "killed/student")
    assert all(torch.equal(p, q) for p, q in zip(s1.parameters(), s2.parameters()))


def test_nan_loss_stops_with_a_named_error_and_keeps_the_last_checkpoint(setup, tmp_path):
    # An absurd generator LR blows the weights up at the first generator update (step 1 with
    # TTUR 1); the checkpoint of step 1 is written; step 2's losses are then non-finite.
    cfg = tiny_config(setup, generator_lr=1e30, warmup_steps=0, ttur=1, checkpoint_every=1, iterations=5)
    with pytest.raises(NonFiniteLoss, match=r"step 2: loss \w+ is (nan|inf)"):
        distill(cfg, tmp_path / "run")
    run = Run(tmp_path / "run")
    status = run.status()
    assert status["state"] == "failed" and "step 2" in status["error"]
    assert [p.name for p in run.checkpoint_dirs()] == ["step-00000001"]
    state = run.load_checkpoint()
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["critic"].values())


def test_corrupt_checkpoint_and_bad_inputs_give_clear_errors(setup, tmp_path):
    cfg = tiny_config(setup, iterations=2, checkpoint_every=2)
    distill(cfg, tmp_path / "run")
    with pytest.raises(RunError, match="already holds a run"):
        distill(cfg, tmp_path / "run")
    (tmp_path / "run/checkpoints/step-00000002/state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="corrupt"):
        distill(cfg, tmp_path / "run", resume=True)
    with pytest.raises(RunError, match="escapes|bad run name"):
        safe_run_dir(tmp_path, "../outside")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["batch_size=0"])


@pytest.mark.parametrize("args, message", [
    (["--config", "no/such.yaml"], "config file not found"),
    (["--set", "ttur=0"], "ttur"),
    (["--set", "nonsense"], "key=value"),
    (["--set", "teacher=/no/such/teacher"], "model folder not found"),
])
def test_cli_bad_inputs_exit_with_one_line(tmp_path, args, message):
    p = _cli(["distill", "--out", str(tmp_path / "run"), *args])
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert message in err and "Traceback" not in err


def test_overrides_accept_exponents_without_a_dot():
    assert load_config(None, ["generator_lr=5e-4"]).generator_lr == 5e-4
    with pytest.raises(ConfigError, match="generator_lr"):
        load_config(None, ["generator_lr=fast"])


def test_old_key_steps_is_read_as_iterations_with_a_deprecation_message(tmp_path):
    old = tmp_path / "config.yaml"                      # a run folder's config.yaml from before the rename
    old.write_text("steps: 7\nbatch_size: 4\n")
    with pytest.warns(FutureWarning, match="'steps' is deprecated, call it 'iterations'"):
        assert load_config(old).iterations == 7
    with pytest.warns(FutureWarning, match="override 'steps=3'"):
        assert load_config(old, ["steps=3"]).iterations == 3
    assert load_config(old, ["iterations=5"]).iterations == 5   # the new name overrides the old file's value
    both = tmp_path / "both.yaml"
    both.write_text("steps: 7\niterations: 8\n")
    with pytest.raises(ConfigError, match="sets both 'steps' and 'iterations'"):
        load_config(both)
    with pytest.raises(ConfigError, match="config iterations=0"):
        load_config(None, ["iterations=0"])


def test_lr_schedule_warms_up_then_follows_cosine_to_the_floor():
    from training.trainer import lr_factor

    f = lr_factor("cosine", warmup_steps=10, horizon=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)          # half way: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert lr_factor("constant", 10, 110, 0.1)(100) == 1.0


def test_resume_with_a_changed_lr_uses_it_and_keeps_the_old_config(setup, tmp_path):
    cfg = tiny_config(setup, iterations=10, ttur=2, checkpoint_every=5, lr_schedule="cosine", lr_min_ratio=0.5)
    distill(cfg, tmp_path / "run", stop_after=5)
    run = distill(tiny_config(setup, iterations=10, ttur=2, checkpoint_every=5, lr_schedule="cosine", lr_min_ratio=0.5,
                              generator_lr=4e-4, critic_lr=2e-4), tmp_path / "run", resume=True)
    tr = run.trainer
    # the end of both cosines (critic: 10 steps, generator: 5): the floor, 0.5 x the new base LRs
    assert tr.opt_c.param_groups[0]["lr"] == pytest.approx(0.5 * 2e-4)
    assert tr.opt_g.param_groups[0]["lr"] == pytest.approx(0.5 * 4e-4)
    assert (tmp_path / "run" / "config.before-step-5.yaml").is_file()
    assert load_config(tmp_path / "run" / "config.yaml").critic_lr == 2e-4
    assert load_config(tmp_path / "run" / "config.before-step-5.yaml").critic_lr == 1e-3


def test_generator_init_starts_generator_and_ema_from_a_student_the_critic_from_the_teacher(setup, family, tmp_path):
    torch.manual_seed(1)
    family.save_student(family.new_unet(**TINY_UNET), tmp_path / "student")  # same network, other weights
    student, teacher = load_pixel_unet(tmp_path / "student"), load_pixel_unet(setup[0])
    tr = DMD2Trainer(tiny_config(setup, generator_init=str(tmp_path / "student")))
    for name, module, source in [("generator", tr.generator_module, student), ("ema", tr.ema, student),
                                 ("fake score", tr.critic_module.fake_unet, teacher), ("real score", tr.real_unet, teacher)]:
        theirs = source.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name
    assert not torch.equal(student.conv_in.weight, teacher.conv_in.weight)  # the check above can tell them apart


def test_generator_init_rejects_a_missing_folder_and_a_different_network(setup, family, tmp_path):
    with pytest.raises(ConfigError, match="generator_init.*existing student folder"):
        DMD2Trainer(tiny_config(setup, generator_init=str(tmp_path / "nowhere")))
    family.save_student(family.new_unet(**dict(TINY_UNET, block_out_channels=(8, 8))), tmp_path / "other")
    with pytest.raises(ConfigError, match="generator_init.*differs from the generator's"):
        DMD2Trainer(tiny_config(setup, generator_init=str(tmp_path / "other")))


def test_string_overrides_keep_yaml_booleans_as_words():
    assert load_config(None, ["mixed_precision=no"]).mixed_precision == "no"
    from training.config import _coerce
    with pytest.raises(ConfigError, match="quote it"):
        _coerce("mixed_precision", False)  # a YAML file's bare `no`: named, not silently taken


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_auto_takes_bf16_only_where_the_hardware_has_it(setup, tmp_path, monkeypatch, native):
    """'auto' autocasts to bf16 on bf16 hardware and runs fp32 elsewhere (emulated bf16 was 17x slower on an
    AVX2 CPU); the run's status.json records what ran. An explicit bf16 without bf16 units is kept but named."""
    import training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "bf16_is_native", lambda device: native)
    trainer = DMD2Trainer(tiny_config(setup, mixed_precision="auto"))
    assert trainer.mixed_precision == ("bf16" if native else "no")
    with trainer.autocast():
        assert torch.is_autocast_enabled("cpu") is native
    distill(tiny_config(setup, mixed_precision="auto", iterations=2), out=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "status.json").read_text())["mixed_precision"] == ("bf16" if native else "no")
    if native:
        assert DMD2Trainer(tiny_config(setup, mixed_precision="bf16")).mixed_precision == "bf16"
    else:
        with pytest.warns(RuntimeWarning, match="mixed_precision: bf16 on a cpu without bf16 units"):
            assert DMD2Trainer(tiny_config(setup, mixed_precision="bf16")).mixed_precision == "bf16"
    assert DMD2Trainer(tiny_config(setup)).mixed_precision == "no"


def test_mixed_precision_rejects_other_values_by_name():
    with pytest.raises(ConfigError, match="mixed_precision.*'bf16', 'no' or 'auto'"):
        load_config(None, ["mixed_precision=fp16"])
    assert load_config(None, ["mixed_precision=auto"]).mixed_precision == "auto"


def test_presets_for_the_embedded_models_ask_for_auto_precision():
    """The MNIST presets run on any CPU: bf16 where it is native, fp32 where bf16 would be emulated."""
    for path in sorted((ROOT / "configs").glob("mnist-*.yaml")) + sorted((ROOT / "configs" / "ablation").glob("*.yaml")):
        assert load_config(str(path), []).mixed_precision == "auto", path


def test_the_cheaper_1step_preset_differs_from_the_preset_only_in_batch_and_iterations():
    """configs/mnist-1step-fast.yaml says "everything else is configs/mnist-1step.yaml": a later edit to one
    preset alone would make its seed table describe a recipe neither file holds."""
    import dataclasses

    full = dataclasses.asdict(load_config(ROOT / "configs" / "mnist-1step.yaml"))
    fast = dataclasses.asdict(load_config(ROOT / "configs" / "mnist-1step-fast.yaml"))
    differ = {key: (full[key], fast[key]) for key in full if full[key] != fast[key]}
    assert differ == {"batch_size": (32, 16), "iterations": (5000, 4000)}


def _changed_and_listed_keys(path, against):
    """The config keys in which `path` resolves differently from `against`, and the keys its file lists."""
    import dataclasses

    import yaml

    cfg, ref = dataclasses.asdict(load_config(path)), dataclasses.asdict(load_config(against))
    return {key for key in ref if cfg[key] != ref[key]}, set(yaml.safe_load(path.read_text())) - {"base"}


def test_each_recall_variant_differs_from_the_cheaper_preset_only_in_what_it_names():
    """configs/recall/*.yaml are one-change studies of the cheaper preset: each must resolve to that preset with
    exactly the keys its file lists changed, or its table would describe a different change."""
    variants = sorted((ROOT / "configs" / "recall").glob("*.yaml"))
    assert len(variants) >= 3
    for path in variants:
        differ, named = _changed_and_listed_keys(path, ROOT / "configs" / "mnist-1step-fast.yaml")
        assert differ == named, (path.name, differ, named)


def test_each_steps_study_differs_from_its_base_only_in_what_it_names():
    """configs/steps/*.yaml say "nothing else changes" against the preset they name as `base:`; a key that no
    longer differs (the base moved to it) or one that differs without being listed breaks that sentence."""
    import yaml

    studies = sorted((ROOT / "configs" / "steps").glob("*.yaml"))
    assert len(studies) >= 3
    for path in studies:
        differ, named = _changed_and_listed_keys(path, path.parent / yaml.safe_load(path.read_text())["base"])
        assert differ == named, (path.name, differ, named)


def test_a_config_file_starts_from_its_base_and_overrides_win(tmp_path):
    (tmp_path / "parent.yaml").write_text("batch_size: 8\nttur: 3\niterations: 20\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\nttur: 4\n")   # relative to its own folder
    (tmp_path / "grandchild.yaml").write_text("base: sub/child.yaml\niterations: 30\n")
    cfg = load_config(tmp_path / "grandchild.yaml", ["batch_size=2"])
    assert (cfg.batch_size, cfg.ttur, cfg.iterations) == (2, 4, 30)
    assert load_config(tmp_path / "sub" / "child.yaml").batch_size == 8
    from training.config import preset_family

    assert preset_family(tmp_path / "grandchild.yaml") == "pixel"
    (tmp_path / "sub" / "child.yaml").write_text("base: ../gone.yaml\nfamily: sdxl\n")
    assert preset_family(tmp_path / "sub" / "child.yaml") == "sdxl"   # still listed (its own family), so the app
    assert preset_family(tmp_path / "grandchild.yaml") == "pixel"     # can say why it does not load: its base
    with pytest.raises(ConfigError, match=r"gone.yaml \(named as the base of .*child.yaml\)"):
        load_config(tmp_path / "grandchild.yaml")


def test_a_bad_base_is_an_error_naming_the_file(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: .*missing.yaml \(named as the base of .*child.yaml\)"):
        load_config(child)
    child.write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base=\['a.yaml'\] must name another config file"):
        load_config(child)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nttur: 2\n")
    with pytest.raises(ConfigError, match=r"bases form a loop: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "old.yaml").write_text("steps: 7\n")                   # a base with the old key name
    child.write_text("base: old.yaml\nbatch_size: 4\n")
    with pytest.warns(FutureWarning, match="old.yaml: config key 'steps' is deprecated") as warned:
        assert load_config(child).iterations == 7
    assert [w.filename for w in warned] == [__file__]                 # it points at the caller, not config.py
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match=r"b.yaml \(named as the base of .*a.yaml\) must hold a mapping"):
        load_config(tmp_path / "a.yaml")


def test_the_quick_evaluation_scores_one_selection_measure_and_none_of_the_independent_ones(monkeypatch):
    """Issue 18: checkpoints and recipes are chosen on one named measure (eval/selection, the classifier FID); the
    independent instruments stay out of training, so they remain a check on what was chosen."""
    import dmd2.metrics.independent as independent
    from dmd2.metrics.mnist import real_digits
    from training.distill import SELECTION, quick_eval

    def never(*args, **kwargs):
        raise AssertionError("the quick evaluation computed an independent measure")

    monkeypatch.setattr(independent, "evaluate_independent", never)
    monkeypatch.setattr(independent, "compare_features", never)
    digits, digit_labels = real_digits()

    class Trainer:  # samples real digits of the asked classes: a stand-in for a student
        family = type("F", (), {"num_classes": 10})()

        def sample(self, labels, seed):
            picks = [np.flatnonzero(digit_labels == c)[(seed + i) % 50] for i, c in enumerate(labels)]
            return torch.from_numpy(digits[picks]).permute(0, 3, 1, 2).float() / 127.5 - 1

    scores = quick_eval(Trainer(), 300)
    assert SELECTION == "fid" and scores["eval/selection"] == scores["eval/fid"]
    assert scores["eval/alignment"] > 0.9                                   # real digits of the asked classes
    assert not any(k.startswith(("eval/classifier_", "eval/autoencoder_")) for k in scores)
