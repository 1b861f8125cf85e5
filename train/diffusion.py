"""Diffusion maths shared by the trainer and the sampler (docs/design.md, "Recipe"), torch only.

SD's "scaled linear" betas 0.00085 -> 0.012 over 1000 steps, epsilon prediction, plain MSE.
The sampler (evaluate/) builds diffusers' DPM-Solver++ from `SCHEDULER_KWARGS`, so both sides use
exactly the same noise schedule; U-ViT's discrete step n corresponds to diffusers' t = n - 1, and the
model is always called with the 0-based integer t.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012

# Keyword arguments for diffusers' schedulers, so the sampler never re-types the schedule.
SCHEDULER_KWARGS = dict(
    num_train_timesteps=NUM_TRAIN_TIMESTEPS,
    beta_start=BETA_START,
    beta_end=BETA_END,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


def scaled_linear_betas(n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    return torch.linspace(BETA_START**0.5, BETA_END**0.5, n, dtype=torch.float64) ** 2


def alphas_cumprod(n: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    return torch.cumprod(1.0 - scaled_linear_betas(n), dim=0)


class NoiseSchedule:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) for integer t in [0, 1000)."""

    def __init__(self, device: torch.device | str = "cpu"):
        abar = alphas_cumprod().float().to(device)
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - abar).sqrt()

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return self.sqrt_abar[t].view(shape) * x0 + self.sqrt_one_minus_abar[t].view(shape) * eps

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator, device=device)


def eps_loss(model, x0: torch.Tensor, context: torch.Tensor, schedule: NoiseSchedule,
             t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Plain MSE between the true and predicted noise (mean over every element)."""
    x_t = schedule.add_noise(x0, eps, t)
    pred = model(x_t, t, context)
    return F.mse_loss(pred.float(), eps.float())


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in U-ViT's convention: eps_c + s * (eps_c - eps_u).

    diffusers' guidance_scale w relates as w = s + 1 (s = 1 is guidance_scale 2).
    """
    return eps_cond + scale * (eps_cond - eps_uncond)


def guidance_scale_equivalent(scale: float) -> float:
    return scale + 1.0
