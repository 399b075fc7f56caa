"""DMD2 losses against hand computations."""

import math

import torch
import torch.nn.functional as F

from training import losses


def test_distribution_matching_grad_matches_hand_computation():
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    x0_real = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    x0_fake = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 0.0]]]])
    # sample 0: p_real = [1, 2], p_fake = [0, 1], mean|p_real| = 1.5 -> grad = [1, 1] / 1.5
    # sample 1: p_real = [-1, -2], p_fake = [0, -1], mean|p_real| = 1.5 -> grad = [-1, -1] / 1.5
    grad = losses.distribution_matching_grad(x, x0_real, x0_fake)
    expected = torch.tensor([[[[1.0, 1.0]]], [[[-1.0, -1.0]]]]) / 1.5
    assert torch.allclose(grad, expected)


def test_distribution_matching_loss_value_and_gradient():
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    loss = losses.distribution_matching_loss(x, x0_real, x0_fake)
    grad = losses.distribution_matching_grad(x.detach(), x0_real, x0_fake)
    assert math.isclose(loss.item(), 0.5 * grad.pow(2).mean().item(), rel_tol=1e-5)
    loss.backward()
    # d/dx 0.5 * mean((x - (x - g))^2) = g / numel: the DMD gradient, scaled by the mean.
    assert torch.allclose(x.grad, grad / x.numel(), atol=1e-7)


def test_distribution_matching_grad_is_zero_when_scores_agree_and_finite_when_real_is_exact():
    x = torch.randn(2, 1, 3, 3)
    x0 = torch.randn(2, 1, 3, 3)
    assert torch.equal(losses.distribution_matching_grad(x, x0, x0), torch.zeros_like(x))
    # p_real == 0 everywhere -> division by zero; nan_to_num keeps the update finite.
    assert torch.isfinite(losses.distribution_matching_grad(x, x, x0)).all()


def test_denoising_loss_is_mse():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 0.0])
    assert math.isclose(losses.denoising_loss(a, b).item(), (0 + 4 + 9) / 3, rel_tol=1e-6)


def test_gan_losses_match_softplus_formulas():
    real = torch.tensor([2.0, -1.0])
    fake = torch.tensor([0.5, -3.0])
    sp = lambda v: math.log1p(math.exp(v))
    expected_critic = (sp(0.5) + sp(-3.0)) / 2 + (sp(-2.0) + sp(1.0)) / 2
    assert math.isclose(losses.gan_critic_loss(real, fake).item(), expected_critic, rel_tol=1e-6)
    assert math.isclose(losses.gan_generator_loss(fake).item(), (sp(-0.5) + sp(3.0)) / 2, rel_tol=1e-6)
    # The critic loss falls when real logits rise and fake logits fall.
    assert losses.gan_critic_loss(real + 1, fake - 1) < losses.gan_critic_loss(real, fake)
    assert torch.allclose(losses.gan_generator_loss(fake), F.softplus(-fake).mean())
