"""Samplers: teacher DDIM with CFG and the few-step student (denoise, re-noise with fresh noise)."""

import numpy as np
import pytest
import torch

from dmd2.sampling import ddim_sample, initial_noise, student_sample
from dmd2.schedule import student_timesteps


@pytest.fixture
def cond(family):
    return family.condition([0, 1, 2])


def test_initial_noise_depends_only_on_seed(family):
    a, b = initial_noise(family, 3, seed=1), initial_noise(family, 3, seed=1)
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, initial_noise(family, 3, seed=2))


def test_ddim_is_deterministic_and_seed_dependent(family, unet, cond):
    run = lambda seed: ddim_sample(family, unet, cond, initial_noise(family, 3, seed), steps=4)
    a = run(0)
    assert a.shape == (3, 1, 8, 8) and a.isfinite().all()
    assert torch.equal(a, run(0))
    assert (a - run(1)).abs().max() > 1e-3


def test_ddim_one_step_is_one_guided_denoise_at_999(family, unet, cond):
    noise = initial_noise(family, 3, seed=3)
    family.default_guidance = 2.0  # a family whose default uses CFG
    out = ddim_sample(family, unet, cond, noise, steps=1)  # guidance defaults to the family's
    with torch.no_grad():
        expected = family.denoise(unet, noise, 999, cond, guidance=2.0)
    assert torch.equal(out, expected)
    assert not torch.allclose(out, ddim_sample(family, unet, cond, noise, steps=1, guidance=1.0))


def test_ddim_two_steps_follow_the_deterministic_update(family, unet, cond):
    """x_{t'} = sqrt(ab') x0 + sqrt(1 - ab') eps(x_t, x0), then x0 at t' (eta = 0)."""
    noise = initial_noise(family, 3, seed=4)
    sched = family.schedule
    with torch.no_grad():
        x0 = family.denoise(unet, noise, 999, cond, guidance=1.5)
        eps = sched.x0_to_eps(noise, x0, torch.tensor([999]))
        x = sched.add_noise(x0, eps, torch.tensor([499]))
        expected = family.denoise(unet, x, 499, cond, guidance=1.5)
    torch.testing.assert_close(ddim_sample(family, unet, cond, noise, steps=2, guidance=1.5), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 5])
def test_ddim_callback_once_per_step(family, unet, cond, steps):
    calls = []
    ddim_sample(family, unet, cond, initial_noise(family, 3, 0), steps=steps, callback=lambda i, n: calls.append((i, n)))
    assert calls == [(i, steps) for i in range(1, steps + 1)]


def test_student_is_deterministic_and_seed_dependent(family, unet, cond):
    ts = student_timesteps(4)
    run = lambda s: student_sample(family, unet, cond, initial_noise(family, 3, s), ts, seed=s)
    a = run(0)
    assert a.shape == (3, 1, 8, 8) and a.isfinite().all()
    assert torch.equal(a, run(0))
    assert (a - run(1)).abs().max() > 1e-3


def test_one_step_student_is_exactly_denoise_at_999(family, unet, cond):
    noise = initial_noise(family, 3, seed=5)
    with torch.no_grad():
        expected = family.denoise(unet, noise, 999, cond)
    assert torch.equal(student_sample(family, unet, cond, noise, [999]), expected)
    # the fresh-noise seed is irrelevant when there is no re-noising
    assert torch.equal(student_sample(family, unet, cond, noise, [999], seed=123), expected)
    # SDXL-style 1-step students condition on another timestep
    with torch.no_grad():
        at_399 = family.denoise(unet, noise, 399, cond)
    assert torch.equal(student_sample(family, unet, cond, noise, student_timesteps(1, first=399)), at_399)


def test_multi_step_student_renoises_with_fresh_noise(family, unet, cond):
    noise = initial_noise(family, 3, seed=6)
    ts = student_timesteps(4)
    a = student_sample(family, unet, cond, noise, ts, seed=10)
    b = student_sample(family, unet, cond, noise, ts, seed=11)
    assert (a - b).abs().max() > 1e-3  # same start, different fresh noise -> different sample
    assert torch.equal(a, student_sample(family, unet, cond, noise, ts, seed=10))


def test_multi_step_student_follows_denoise_renoise(family, unet, cond):
    noise = initial_noise(family, 3, seed=8)
    ts = [999, 499]
    gen = torch.Generator().manual_seed(42)
    with torch.no_grad():
        x0 = family.denoise(unet, noise, 999, cond)
        x = family.schedule.add_noise(x0, torch.randn(x0.shape, generator=gen), torch.tensor([499]))
        expected = family.denoise(unet, x, 499, cond)
    assert torch.equal(student_sample(family, unet, cond, noise, ts, seed=42), expected)


def test_student_guidance_is_passed_to_denoise(family, unet, cond):
    noise = initial_noise(family, 3, seed=9)
    with torch.no_grad():
        expected = family.denoise(unet, noise, 999, cond, guidance=3.0)
    assert torch.equal(student_sample(family, unet, cond, noise, [999], guidance=3.0), expected)


def test_samplers_do_not_build_graphs(family, make_unet, cond):
    unet = make_unet(0).requires_grad_(True)
    noise = initial_noise(family, 3, 0)
    assert not ddim_sample(family, unet, cond, noise, steps=2).requires_grad
    assert not student_sample(family, unet, cond, noise, [999, 499]).requires_grad


def test_a_generated_multi_step_sample_renoises_with_fresh_noise_not_its_starting_noise(tmp_path, family, unet):
    """generate(seed=s) starts from initial_noise(s); the student's re-noising draws from another stream
    (renoise_seed(s)), so the first fresh noise is not the starting noise again."""
    from dmd2 import registry
    from dmd2.sampling import renoise_seed

    family.save_student(unet, tmp_path / "s", timesteps=[999, 499])
    model = registry.LoadedModel(registry.spec_for(str(tmp_path / "s")))
    seen = []
    noise = initial_noise(family, 3, seed=4)
    cond = family.condition([0, 1, 2])
    student_sample(family, unet, cond, noise, [999, 499], seed=renoise_seed(4), on_step=lambda i, t, x0: seen.append(x0))
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(renoise_seed(4)))
    assert not torch.equal(fresh, noise)
    with torch.no_grad():
        expected = family.denoise(unet, family.schedule.add_noise(seen[0], fresh, torch.tensor([499])), 499, cond)
    got = model.generate([0, 1, 2], seed=4).images
    np.testing.assert_array_equal(got, registry.to_uint8(family.decode(expected)))
    assert len({renoise_seed(s) for s in range(1000)} | set(range(1000))) == 2000   # no collisions with seeds
