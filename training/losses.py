"""DMD2 losses as pure functions of tensors (Yin et al., 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.config import DIVERGENCES


def distribution_matching_grad(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """The DMD gradient (eq. 2 of DMD, normalised as in DMD2): (p_real - p_fake) / mean|p_real| per sample.

    p_real = x - x0_real and p_fake = x - x0_fake, where x0_* are the real (teacher, with CFG) and
    fake score's denoised estimates of a noised copy of the generator output `x`.
    """
    p_real = x - x0_real
    p_fake = x - x0_fake
    weight = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((p_real - p_fake) / weight)


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                               weights: torch.Tensor | None = None) -> torch.Tensor:
    """0.5 * mse(x, (x - grad).detach()): a surrogate whose gradient w.r.t. x is grad / x.numel(); with
    `weights` (one per sample, see `divergence_weights`) sample i's gradient is scaled by weights[i]."""
    grad = distribution_matching_grad(x.detach().float(), x0_real.float(), x0_fake.float())
    if weights is not None:
        grad = grad * weights.detach().float().view(-1, *([1] * (x.ndim - 1)))
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad).detach(), reduction="mean")


def score_identity_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """Score identity distillation's generator loss (SiD; Zhou et al., 2024, their eq. for L_theta with alpha):

        (1 - alpha) |d|^2 + d . (x0_fake - x),   d = x0_real - x0_fake,

    per element, each sample divided by mean|x - x0_real| (detached, as DMD2 normalises), averaged. `x` is the
    generator's output and x0_* the two denoisers' estimates from a noised copy of it; unlike DMD's surrogate, the
    gradient is meant to flow through all three (the scores' inputs depend on x). Held fixed, the denoisers leave
    only the d . (-x) term, whose gradient is DMD's (`distribution_matching_loss`): SiD adds what comes through
    the two denoisers. The loss is 0 wherever the fake score equals the real one.
    """
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    dims = tuple(range(1, x.ndim))
    weight = (x - x0_real).detach().abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    d = x0_real - x0_fake
    return ((1 - alpha) * d.square() + d * (x0_fake - x)).div(weight).mean()


def divergence_weights(log_ratio: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per-sample weights that turn the DMD gradient into the gradient of another f-divergence.

    For D_f(p || q) = E_q[f(p / q)] the generator's gradient is the DMD score difference weighted by
    h(r) = f''(r) r^2, r = p_t(x_t) / q_t(x_t) (Xu, Nie and Vahdat, 2025, "f-distill"). Reverse KL, f = -log r
    (DMD, DMD2): h = 1. Forward KL, f = r log r (mode covering): h = r. Jensen-Shannon,
    f = r log r - (1 + r) log((1 + r) / 2): h = r / (1 + r). `log_ratio` is log r per sample, as a GAN
    discriminator trained with the logistic loss estimates it (its logit). The weights are divided by their
    batch mean, so the loss keeps DMD's scale and only the balance between samples changes.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; one of {', '.join(DIVERGENCES)}")
    log_ratio = log_ratio.detach().float()
    if divergence == "reverse-kl":
        return torch.ones_like(log_ratio)
    if divergence == "forward-kl":
        return len(log_ratio) * torch.softmax(log_ratio, dim=0)   # r / mean(r), without overflow
    return len(log_ratio) * torch.softmax(F.logsigmoid(log_ratio), dim=0)   # h / mean(h), h = sigmoid(log r)


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
