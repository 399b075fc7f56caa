"""DMD2 losses as pure functions of tensors (Yin et al., 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distribution_matching_grad(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The DMD gradient (eq. 2 of DMD, normalised as in DMD2): (p_real - p_fake) / mean|p_real| per sample.

    p_real = x - x0_real and p_fake = x - x0_fake, where x0_* are the real (teacher, with CFG) and
    fake score's denoised estimates of a noised copy of the generator output `x`.
    """
    p_real = x - x0_real
    p_fake = x - x0_fake
    weight = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / weight)


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * mse(x, (x - grad).detach()): a surrogate whose gradient w.r.t. x is grad / x.numel()."""
    grad = distribution_matching_grad(x.detach().float(), x0_real.float(), x0_fake.float())
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach(), reduction="mean")


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fake-score loss: MSE between the network output and its target (eps, v or x0)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def gan_critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss: softplus(fake) + softplus(-real), each averaged."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: softplus(-fake), averaged."""
    return F.softplus(-fake_logits.float()).mean()


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DMD's regression term: MSE between the student's samples and the teacher's from the same noise (DMD used
    LPIPS on its images; pixel MSE here, where no perceptual network is at hand)."""
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
