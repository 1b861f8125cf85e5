"""Diffusion maths shared by the trainer and the sampler (docs/design.md, "Recipe"), torch only.

SD's "scaled linear" betas 0.00085 -> 0.012 over 1000 steps. The paper's recipe is epsilon prediction with
plain MSE; the prediction target (epsilon | v) and the loss weighting (uniform | min-SNR-gamma) are
TrainConfig knobs (docs/training.md, "Prediction target, loss weighting, normalisation"). The sampler (evaluate/) builds diffusers' DPM-Solver++ from `SCHEDULER_KWARGS`, so both sides use
exactly the same noise schedule; U-ViT's discrete step n corresponds to diffusers' t = n - 1, and the
model is always called with the 0-based integer t.
"""
from __future__ import annotations

import torch

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


PREDICTIONS = ("epsilon", "v")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view((-1,) + (1,) * (like.dim() - 1))


def prediction_target(x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                      prediction: str) -> torch.Tensor:
    """What the network is trained to output for x_t = alpha x0 + sigma eps: eps, or v = alpha eps - sigma x0."""
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return _per_sample(alpha, x0) * eps - _per_sample(sigma, x0) * x0
    raise ValueError(f"unknown prediction target {prediction!r}: expected one of {PREDICTIONS}")


def eps_from_prediction(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str = "epsilon"):
    """The network's output as a noise prediction (alpha, sigma: floats or per-sample tensors).

    v = alpha eps - sigma x0 and x = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1) give eps = sigma x + alpha v.
    """
    if prediction == "epsilon":
        return output
    if prediction == "v":
        if torch.is_tensor(alpha):
            alpha, sigma = _per_sample(alpha, x), _per_sample(sigma, x)
        return sigma * x + alpha * output
    raise ValueError(f"unknown prediction target {prediction!r}: expected one of {PREDICTIONS}")


def x0_from_prediction(output: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction: str = "epsilon"):
    """The clean image the network's output implies: x0 = (x - sigma eps) / alpha (v: alpha x - sigma v)."""
    if prediction == "v":
        if torch.is_tensor(alpha):
            alpha, sigma = _per_sample(alpha, x), _per_sample(sigma, x)
        return alpha * x - sigma * output
    eps = eps_from_prediction(output, x, alpha, sigma, prediction)
    if torch.is_tensor(alpha):
        alpha, sigma = _per_sample(alpha, x), _per_sample(sigma, x)
    return (x - sigma * eps) / alpha


def loss_weight(snr: torch.Tensor, prediction: str, weighting: str, gamma: float) -> torch.Tensor:
    """Per-sample weight of the MSE. min-SNR-gamma (Hang et al. 2023) weighs each t as if the loss were an x0
    loss clipped at SNR gamma: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    if weighting == "uniform":
        return torch.ones_like(snr)
    if weighting == "min_snr":
        clipped = snr.clamp(max=gamma)
        return clipped / snr if prediction == "epsilon" else clipped / (snr + 1.0)
    raise ValueError(f"unknown loss weighting {weighting!r}: expected one of {LOSS_WEIGHTINGS}")


def diffusion_loss(model, x0: torch.Tensor, context: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor,
                   eps: torch.Tensor, *, prediction: str = "epsilon", weighting: str = "uniform",
                   gamma: float = 5.0) -> torch.Tensor:
    """Weighted MSE between the network's output and its target, mean over every element. With epsilon and
    uniform weights this is the paper's loss, MSE(eps_pred, eps)."""
    alpha, sigma = schedule.sqrt_abar[t], schedule.sqrt_one_minus_abar[t]
    x_t = schedule.add_noise(x0, eps, t)
    pred = model(x_t, t, context).float()
    target = prediction_target(x0.float(), eps.float(), alpha, sigma, prediction)
    if weighting == "uniform":
        return (pred - target).pow(2).mean()
    per_sample = (pred - target).pow(2).flatten(1).mean(1)
    return (loss_weight((alpha / sigma) ** 2, prediction, weighting, gamma) * per_sample).mean()


def guided_eps(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in U-ViT's convention: eps_c + s * (eps_c - eps_u).

    diffusers' guidance_scale w relates as w = s + 1 (s = 1 is guidance_scale 2).
    """
    return eps_cond + scale * (eps_cond - eps_uncond)


def guidance_scale_equivalent(scale: float) -> float:
    return scale + 1.0
