"""Text-to-image sampling: DPM-Solver++ (diffusers) with classifier-free guidance (DESIGN.md §7, CONTRACTS §5).

    latents = sample(model, context, null_context, steps=50, scale=1.0, seeds=[...])

- The schedule is the trainer's (`train.diffusion.SCHEDULER_KWARGS`); the solver is diffusers'
  `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_order=2`: one model evaluation
  per step, so `steps=50` is the paper's 50 model evaluations. `set_timesteps` resets the solver's history,
  but a fresh instance per call keeps concurrent calls (and the attention analysis) independent.
- Guidance is U-ViT's eps_c + s (eps_c - eps_u) (`train.diffusion.guided_eps`), where eps_u is the model
  run on the shard set's encoding of "" (never zeros). The conditional and unconditional halves go through
  the model as ONE doubled batch of fixed shape [2B, ...], so a compiled model never sees a new shape.
- The initial noise of image i comes from its own CPU generator seeded with `seeds[i]`; the ODE solver adds
  no noise afterwards. A prompt and seed therefore give the same image for every variant, batch size and
  batch composition (up to float rounding), and on any device.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DPMSolverMultistepScheduler

from train.diffusion import SCHEDULER_KWARGS, guided_eps

# (step index, timestep, {block name: [B, heads, patches, text] probabilities of the conditional half})
AttentionCallback = Callable[[int, int, dict], None]


def make_scheduler(steps: int) -> DPMSolverMultistepScheduler:
    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_KWARGS, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    return scheduler


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """[B, *latent_shape] float32 on CPU; row i depends on seeds[i] only."""
    return torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def sample(model, context: torch.Tensor, null_context: torch.Tensor, *, steps: int = 50, scale: float = 1.0,
           seed: int = 0, seeds: Sequence[int] | None = None, latent_shape: Sequence[int] | None = None,
           attention_callback: AttentionCallback | None = None) -> torch.Tensor:
    """Model-space latents [B, C, S, S] (float32) for the text encodings `context` [B, T, D].

    `null_context` [T, D] is the encoding of "". Image i starts from the noise of `seeds[i]`
    (default `seed + i`). `model` is any eps(x_t, t, context) with the UViT signature; EMA weights in eval
    mode are the caller's choice (`train.checkpoint.load_run` gives them).
    """
    device = context.device
    B = context.shape[0]
    seeds = list(range(seed, seed + B)) if seeds is None else list(seeds)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {B} prompts: pass one seed per prompt")
    if latent_shape is None:
        cfg = model.cfg
        latent_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)

    scheduler = make_scheduler(steps)
    x = initial_noise(seeds, latent_shape).to(device) * scheduler.init_noise_sigma
    # Conditional first, unconditional second: the attention callback keeps the first half.
    both_contexts = torch.cat([context, null_context.to(context).expand(B, -1, -1)])
    record = attention_callback is not None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    for i, t in enumerate(scheduler.timesteps):
        timesteps = torch.full((2 * B,), int(t), device=device, dtype=torch.long)
        with autocast:
            out = model(torch.cat([x, x]), timesteps, both_contexts, record_attention=record)
        eps, extras = out if record else (out, None)
        eps_cond, eps_uncond = eps.float().chunk(2)
        if record:
            attention_callback(i, int(t), {name: probs[:B] for name, probs in extras["attention"].items()})
        x = scheduler.step(guided_eps(eps_cond, eps_uncond, scale), t, x).prev_sample
    return x
