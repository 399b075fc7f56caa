"""The DDPM noise schedule: conversions between x0, eps, v and x_t, and the timestep lists."""

import pytest
import torch

from dmd2.schedule import NoiseSchedule, ddim_timesteps, student_timesteps

KINDS = ["linear", "scaled_linear", "cosine"]
PREDICTION_TYPES = ["epsilon", "v_prediction", "sample"]


def _x0_noise(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randn(n, 1, 8, 8, generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(kind):
    ab = NoiseSchedule(kind).alphas_cumprod
    assert ab.shape == (1000,)
    assert (ab > 0).all() and (ab <= 1).all()
    assert (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.99 and ab[-1] < 0.01  # nearly clean at t=0, nearly pure noise at t=999


@pytest.mark.parametrize("kind", KINDS)
def test_eps_round_trip_recovers_x0_away_from_the_noisy_end(kind):
    s = NoiseSchedule(kind)
    x0, eps = _x0_noise()
    for t in (0, 10, 250, 500, 800):
        tt = torch.full((4,), t)
        x_t = s.add_noise(x0, eps, tt)
        torch.testing.assert_close(s.eps_to_x0(x_t, eps, tt), x0, atol=1e-4, rtol=0)
        torch.testing.assert_close(s.x0_to_eps(x_t, x0, tt), eps, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_v_round_trip_recovers_x0_everywhere(kind):
    s = NoiseSchedule(kind)
    x0, eps = _x0_noise()
    for t in (0, 500, 980, 998, 999):
        tt = torch.full((4,), t)
        x_t = s.add_noise(x0, eps, tt)
        v = s.velocity(x0, eps, tt)
        torch.testing.assert_close(s.v_to_x0(x_t, v, tt), x0, atol=1e-5, rtol=0)


def test_v_round_trip_at_t999_cosine_where_eps_is_ill_posed():
    s = NoiseSchedule("cosine")
    x0, eps = _x0_noise()
    t = torch.full((4,), 999)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(s.v_to_x0(x_t, s.velocity(x0, eps, t), t), x0, atol=1e-5, rtol=0)
    # the same recovery through eps divides by sqrt(ab_999) ~ 5e-5: a tiny eps error explodes
    bad = s.eps_to_x0(x_t, eps + 1e-3, t)
    assert (bad - x0).abs().mean() > 1.0


def test_add_noise_uses_each_samples_own_timestep():
    s = NoiseSchedule("cosine")
    x0, eps = _x0_noise()
    t = torch.tensor([0, 300, 700, 999])
    batched = s.add_noise(x0, eps, t)
    for i in range(4):
        one = s.add_noise(x0[i:i + 1], eps[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], one)
    ab = s.alphas_cumprod
    torch.testing.assert_close(batched[3], ab[999].sqrt() * x0[3] + (1 - ab[999]).sqrt() * eps[3])
    assert batched.dtype == x0.dtype


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_target_converts_back_to_x0(kind, prediction_type):
    """A perfect network (output == target) must give back x0 through to_x0."""
    s = NoiseSchedule(kind)
    x0, eps = _x0_noise()
    t = torch.tensor([1, 200, 500, 800])
    x_t = s.add_noise(x0, eps, t)
    target = s.target(x0, eps, t, prediction_type)
    torch.testing.assert_close(s.to_x0(x_t, target, t, prediction_type), x0, atol=1e-4, rtol=0)


def test_targets_are_what_each_prediction_type_means():
    s = NoiseSchedule("cosine")
    x0, eps = _x0_noise()
    t = torch.tensor([5, 100, 600, 999])
    assert torch.equal(s.target(x0, eps, t, "epsilon"), eps)
    assert torch.equal(s.target(x0, eps, t, "sample"), x0)
    assert torch.equal(s.target(x0, eps, t, "v_prediction"), s.velocity(x0, eps, t))
    # v = sqrt(ab) eps - sqrt(1-ab) x0: at t=999 (cosine) v is almost -x0, at t=5 almost eps
    torch.testing.assert_close(s.velocity(x0, eps, t)[3], -x0[3], atol=1e-3, rtol=0)
    torch.testing.assert_close(s.velocity(x0, eps, t)[0], eps[0], atol=2e-2, rtol=0)


def test_unknown_prediction_type_and_schedule_kind_raise():
    s = NoiseSchedule("cosine")
    x0, eps = _x0_noise()
    t = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="prediction type"):
        s.to_x0(x0, eps, t, "velocity")
    with pytest.raises(ValueError, match="prediction type"):
        s.target(x0, eps, t, "velocity")
    with pytest.raises(ValueError, match="unknown beta schedule"):
        NoiseSchedule("sigmoid")


def test_student_timesteps():
    assert student_timesteps(1) == [999]
    assert student_timesteps(2) == [999, 499]
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(1, first=399) == [399]
    assert student_timesteps(4, first=399) == [999, 749, 499, 249]  # `first` only overrides 1-step
    with pytest.raises(ValueError):
        student_timesteps(0)
    with pytest.raises(ValueError):
        student_timesteps(-2)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 50, 333, 999, 1000])
def test_ddim_timesteps_start_at_999_and_strictly_decrease(steps):
    ts = ddim_timesteps(steps)
    assert len(ts) == steps
    assert ts[0] == 999
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert ts[-1] >= 0
    assert all(isinstance(t, int) for t in ts)


def test_ddim_timesteps_bad_steps_raise():
    assert ddim_timesteps(1000) == list(range(999, -1, -1))
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(bad)
