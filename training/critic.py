"""The two scores DMD2 compares, and the GAN head on the fake score's bottleneck."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from dmd2.families.base import Family
from training import losses


class GanHead(nn.Module):
    """Small conv classifier on bottleneck features: one realism logit per sample."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        groups = groups if channels % groups == 0 else 1
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, 1, kernel_size=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).mean(dim=(1, 2, 3))


class OfficialGanHead(nn.Module):
    """The official DMD2 head (`cls_pred_branch`): 4x4 stride-2 convs down to 4x4, a 4x4 stride-4 conv to 1x1
    (each with GroupNorm 32 and SiLU), then a 1x1 conv to one logit.

    `size` is the bottleneck's side at training resolution: 32 for SDXL at 1024 px (three stride-2 convs,
    as sdxl_guidance.py), 8 for SD1.5 at 512 px (one, as sd_guidance.py). At a side below 4 the last conv
    shrinks to cover it; any spatial output left is averaged.
    """

    def __init__(self, channels: int, size: int, groups: int = 32):
        super().__init__()
        groups = groups if channels % groups == 0 else 1
        layers = []

        def block(kernel, stride, padding):
            layers.extend([nn.Conv2d(channels, channels, kernel_size=kernel, stride=stride, padding=padding),
                           nn.GroupNorm(groups, channels), nn.SiLU()])

        while size > 4:
            block(4, 2, 1)
            size //= 2
        block(min(4, size), min(4, size), 0)
        layers.append(nn.Conv2d(channels, 1, kernel_size=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).mean(dim=(1, 2, 3))


GAN_HEADS = ("small", "official")


def bottleneck_size(family: Family, unet: nn.Module) -> int:
    """The side of the UNet's mid-block features at the family's training resolution (the shorter side);
    a family whose network has no down blocks (a transformer) says it with its own `bottleneck_size`."""
    if hasattr(family, "bottleneck_size"):
        return family.bottleneck_size(unet)
    side = min(family.latent_shape(1)[-2:])
    for block in unet.down_blocks:
        if getattr(block, "downsamplers", None):
            side = (side + 1) // 2  # diffusers' 3x3 stride-2 conv with padding 1
    return side


def gan_head(kind: str, family: Family, unet: nn.Module) -> nn.Module:
    """The GAN head `kind` ("small": ours, conv-conv-conv and a spatial mean; "official": DMD2's) for `unet`."""
    channels = family.bottleneck_channels(unet)
    if kind == "official":
        return OfficialGanHead(channels, bottleneck_size(family, unet))
    if kind == "small":
        return GanHead(channels)
    raise ValueError(f"unknown GAN head {kind!r}; one of {', '.join(GAN_HEADS)}")


class Critic(nn.Module):
    """Trainable fake score (initialised from the teacher) + GAN head.

    Every use goes through `forward(..., call=<method>)`, so that a DDP/FSDP wrapper sees it (FSDP
    gathers the sharded weights only inside a forward): `losses` is the critic's own objective; the
    generator side calls `fake_x0` and `realism_logits` inside `frozen()`, so no weight gradients are
    computed for the critic there.
    """

    def __init__(self, family: Family, teacher: nn.Module, use_gan: bool = True, num_steps: int = 0,
                 head: str = "small", guidance_dim: int = 0, fake: nn.Module | None = None):
        super().__init__()
        self.family = family
        # guidance_dim > 0: the fake score takes the guidance scale w as an input (a guidance-conditioned
        # student's outputs differ with w; without it the fake score would model their mixture over w).
        # `fake`: a fake-score network to train instead of the teacher's copy (a deeper one that starts as it).
        if fake is None:
            fake = family.guidance_conditioned(teacher, guidance_dim) if guidance_dim else copy.deepcopy(teacher)
        self.fake_unet = fake.train().requires_grad_(True)
        self.gan_head = gan_head(head, family, teacher) if use_gan else None
        # Per-step critic (num_steps > 0): one embedding per student step, added to the fake score's time
        # embedding, so it models the outputs of each step apart. Zero at the start: the teacher's copy.
        self.step_embedding = None
        self._step = None
        if num_steps:
            dim = self.fake_unet.time_embedding.linear_2.out_features
            self.step_embedding = nn.Parameter(torch.zeros(num_steps, dim))
            self.fake_unet.time_embedding.register_forward_hook(self._add_step_embedding)

    @contextlib.contextmanager
    def frozen(self):
        """No weight gradients inside (gradients still flow to the inputs)."""
        flags = [p.requires_grad for p in self.parameters()]
        self.requires_grad_(False)
        try:
            yield self
        finally:
            for p, f in zip(self.parameters(), flags):
                p.requires_grad_(f)

    def _add_step_embedding(self, module, args, output):
        if self._step is None:
            raise RuntimeError("this critic is per student step: call it with step=<the step that made the samples>")
        return output + self.step_embedding[self._step].to(output.dtype)

    def fake_x0(self, x_t, t, cond, guidance_input=None) -> torch.Tensor:
        """The fake score's x0 estimate (no CFG; a guidance-conditioned critic also takes w)."""
        return self.family.denoise(self.fake_unet, x_t, t, cond, guidance=1.0, guidance_input=guidance_input)

    def realism_logits(self, x0, cond, t, noise, guidance_input=None) -> torch.Tensor:
        """GAN logits of clean images x0 after noising them to t (diffusion GAN)."""
        x_t = self.family.schedule.add_noise(x0, noise, t)
        return self.gan_head(self.family.bottleneck(self.fake_unet, x_t, t, cond, guidance_input))

    @contextlib.contextmanager
    def at_step(self, step: int | None):
        """Inside, the critic judges outputs of student step `step` (0-based).

        A per-step critic needs it (its real-image GAN branch then asks "real, or the output of this
        step?"); a plain one ignores it.
        """
        if self.step_embedding is not None and not (
                isinstance(step, int) and not isinstance(step, bool) and 0 <= step < len(self.step_embedding)):
            raise ValueError(f"this critic is per student step: step must be in 0..{len(self.step_embedding) - 1}, "
                             f"not {step!r}")
        self._step = step
        try:
            yield self
        finally:
            self._step = None

    def forward(self, *args, call: str = "losses", step: int | None = None, **kwargs):
        """Dispatch to the method named by `call` (losses, fake_x0 or realism_logits) at student step `step`."""
        if call not in ("losses", "fake_x0", "realism_logits"):
            raise ValueError(f"unknown critic call {call!r}")
        with self.at_step(step):
            return getattr(self, call)(*args, **kwargs)

    def losses(self, fake_x0, fake_cond, real_x0, real_cond, draws: dict) -> dict:
        """Critic losses on detached generator samples and real images; `draws` holds the random t/noise.

        Returns {"fake_denoise": ..., "gan_critic": ...} (the latter only with a GAN head). A
        guidance-conditioned critic takes `draws["w"]`, the scales the samples were made at, on both
        branches (the real images are judged at the same w as the fakes they are compared with).
        """
        fam = self.family
        t, noise, w = draws["t"], draws["noise"], draws.get("w")
        x_t = fam.schedule.add_noise(fake_x0, noise, t)
        pred = fam.model_output(self.fake_unet, x_t, t, fake_cond, guidance_input=w)
        out = {"fake_denoise": losses.denoising_loss(pred, fam.schedule.target(fake_x0, noise, t, fam.prediction_type))}
        if self.gan_head is not None:
            fake_logits = self.realism_logits(fake_x0, fake_cond, draws["gan_t_fake"], draws["gan_noise_fake"], w)
            real_logits = self.realism_logits(real_x0, real_cond, draws["gan_t_real"], draws["gan_noise_real"], w)
            out["gan_critic"] = losses.gan_critic_loss(real_logits, fake_logits)
            out["real_logit"] = real_logits.detach().mean()
            out["fake_logit"] = fake_logits.detach().mean()
        return out
