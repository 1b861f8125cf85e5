"""Preview grids while training: a few fixed val captions, one fixed seed each, sampled with the EMA model.

The real sampler (DPM-Solver++ through diffusers) lives in evaluate/, which train must not import, and the
training step has to run on a GPU machine with torch alone; so previews use a short deterministic DDIM
(eta = 0) written here on the same schedule as training (train/diffusion.py). It is for watching a run,
not for scoring it.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from ifvit.files import atomic_path
from train.diffusion import NUM_TRAIN_TIMESTEPS, alphas_cumprod, eps_from_prediction, guided_eps


@torch.no_grad()
def ddim_sample(model, context: torch.Tensor, null_context: torch.Tensor, *, seeds: list[int], steps: int = 25,
                scale: float = 3.0, autocast_dtype: torch.dtype | None = None, prediction: str = "epsilon") -> torch.Tensor:
    """Network-space samples [B, C, S, S] for `context` [B, T, D], guidance eps_c + s (eps_c - eps_u), for a
    network whose output is `prediction` (epsilon | v). Normalisation is the caller's (train/monitor.py).

    Image i starts from noise drawn on the CPU from `torch.Generator().manual_seed(seeds[i])`, so a prompt
    and seed give the same picture at every point of training.
    """
    cfg, device = model.cfg, context.device
    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    abar = alphas_cumprod().float().to(device)
    ts = torch.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, steps).round().long().tolist()
    both = torch.cat([context, null_context.expand_as(context)])  # one forward for cond + uncond
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(torch.cat([x, x]), torch.full((2 * len(x),), t, device=device), both).float()
        eps = eps_from_prediction(out, torch.cat([x, x]), a_t.sqrt(), (1 - a_t).sqrt(), prediction)
        eps = guided_eps(*eps.chunk(2), scale)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def pixels_to_uint8(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Model-space pixels in [-1, 1] (times the shard set's scale) -> uint8 [B, 3, H, W]."""
    return ((x / scale).clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)


def grid_figure(images: torch.Tensor, captions: list[str], title: str = ""):
    """A matplotlib figure of uint8 [B, 3, H, W] images, row-major, each caption above its image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        ax.imshow(img.permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(cap, 24)[:3]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def save_figure(fig, path: Path) -> None:
    """PNG written atomically (a preview is never seen half-written)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
