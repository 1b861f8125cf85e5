"""Text-to-image sampling: an ODE solver with classifier-free guidance (docs/CONTRACTS.md §5, docs/sampling.md).

    latents = sample(model, context, null_context, steps=50, scale=1.0, seeds=[...], solver="uvit")

Two solvers of the probability-flow ODE, both on the trainer's schedule (`train.diffusion`), both spending
exactly `steps` model evaluations (each one doubled batch, conditional + unconditional):

- "uvit" (default): U-ViT's own sampling path, the one its published FIDs come from -- DPM-Solver++ in
  its singlestep "fast" form (third-order steps, a last second- or first-order step so the orders add up to
  `steps`), on a grid uniform in time from label 999 to label 0, returning x at label 0 (not at sigma 0).
- "dpmpp2m": diffusers' `DPMSolverMultistepScheduler` (dpmsolver++, order 2) on diffusers' grid, ending at
  sigma 0; the sampler this toolkit used before.

Time labels. The model is always called with this project's label convention: t = 0..999 where t is the
0-based index into the training schedule's alphas_cumprod (U-ViT's networks count 1..1000 for the same
noise levels; a converted U-ViT network adds that offset itself, from its model config). The `uvit` grid
is fractional: U-ViT's solver runs in continuous time tau in [1/N, 1] with log(alpha) interpolated linearly
between the N discrete levels (level n at tau = n/N) and feeds its network N*tau; in our labels that is
t = N*tau - 1, running 999, 979.02, ..., 0 for 50 steps.

- Guidance is U-ViT's eps_c + s (eps_c - eps_u) (`train.diffusion.guided_eps`), where eps_u is the model
  run on the shard set's encoding of "" (never zeros). The two halves go through the model as ONE doubled
  batch of fixed shape [2B, ...], so a compiled model never sees a new shape.
- The solvers only see a function (x, t) -> eps: the model's output goes through `eps_from_prediction`
  first, so a model trained with another target (v) plugs in without touching the solvers.
- The initial noise of image i comes from its own CPU generator seeded with `seeds[i]`; the ODE solvers add
  no noise afterwards. A prompt and seed therefore give the same image for every variant, batch size and
  batch composition (up to float rounding), and on any device.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from train.diffusion import NUM_TRAIN_TIMESTEPS, SCHEDULER_KWARGS, alphas_cumprod, eps_from_prediction, guided_eps
from train.normalization import Normalization

SOLVERS = ("uvit", "dpmpp2m")
DEFAULT_SOLVER = "uvit"
SOLVER_NOTES = {
    "uvit": "U-ViT's DPM-Solver++ (singlestep 'fast': order 3 steps + one lower-order step, time-uniform grid "
            "t = 999 -> 0, ends at t = 0)",
    "dpmpp2m": "DPM-Solver++ (diffusers DPMSolverMultistepScheduler, order 2, diffusers' grid, ends at sigma 0)",
}

# (model evaluation index, time label, {block name: [B, heads, patches, text] probabilities, conditional half})
AttentionCallback = Callable[[int, float, dict], None]
# What the solvers integrate: the guided noise prediction for the whole batch at one time label.
EpsFn = Callable[[torch.Tensor, float], torch.Tensor]


# ----------------------------------------------------------------------------------------- the schedule

class ContinuousSchedule:
    """alpha, sigma, lambda = log(alpha / sigma) at fractional time labels t in [0, 999], in float64.

    log(alpha) is interpolated linearly between the integer labels, where it is 0.5 log(alphas_cumprod):
    the continuous extension U-ViT's solver uses (its NoiseScheduleVP('discrete')), so both agree exactly at
    every grid point, fractional or not.
    """

    def __init__(self):
        self.half_log_abar = (0.5 * alphas_cumprod().log()).tolist()

    def log_alpha(self, t: float) -> float:
        if not 0.0 <= t <= NUM_TRAIN_TIMESTEPS - 1:
            raise ValueError(f"time label {t} outside [0, {NUM_TRAIN_TIMESTEPS - 1}]")
        lo = min(int(math.floor(t)), NUM_TRAIN_TIMESTEPS - 2)
        frac = t - lo
        return (1.0 - frac) * self.half_log_abar[lo] + frac * self.half_log_abar[lo + 1]

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        log_alpha = self.log_alpha(t)
        return math.exp(log_alpha), math.sqrt(-math.expm1(2.0 * log_alpha))

    def lam(self, t: float) -> float:
        alpha, sigma = self.alpha_sigma(t)
        return math.log(alpha) - math.log(sigma)


# ----------------------------------------------------------------------------------------- the uvit solver
# Hand-written: diffusers' DPMSolverSinglestepScheduler(solver_order=3) has the same grouping of orders,
# but cannot take U-ViT's path. (1) Its timesteps are integers (custom ones are cast to int64); U-ViT's
# time-uniform grid is fractional (979.02, ...). (2) Between integer steps it interpolates sigma linearly,
# U-ViT log(alpha). (3) Its `solver_type` picks one family of update formulas for every order, while U-ViT
# mixes them: a group's middle state comes from the second-order "heun" formula, the group's end and the
# last second-order step from the "midpoint" ones; either choice leaves U-ViT's path at O(h^3).
# Notation below (DPM-Solver++ paper): h = lambda_t - lambda_s, phi1 = expm1(-h), phi2 = phi1 / h + 1.

def uvit_orders(steps: int) -> list[int]:
    """Solver order of each step of U-ViT's 'fast' schedule; the orders add up to `steps` evaluations."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    threes, rest = divmod(steps, 3)
    if rest == 0:  # e.g. 3 -> [2, 1], 6 -> [3, 2, 1]
        return [3] * (threes - 1) + [2, 1]
    return [3] * threes + [rest]  # 50 -> 16 x [3] + [2]


def uvit_grid(steps: int) -> list[float]:
    """steps + 1 time labels uniform from 999 to 0 (U-ViT: tau uniform from 1 to 1/N); every point is visited
    by one model evaluation (the intermediate points of a singlestep group are grid points)."""
    top = NUM_TRAIN_TIMESTEPS - 1
    return [top * (1.0 - k / steps) for k in range(steps + 1)]


def solve_uvit(eps_fn: EpsFn, x: torch.Tensor, steps: int,
               schedule: ContinuousSchedule | None = None) -> torch.Tensor:
    """x at label 0 from x at label 999, in exactly `steps` calls of eps_fn (DPM-Solver++, data prediction)."""
    ns = schedule or ContinuousSchedule()
    grid = uvit_grid(steps)

    def x0_at(x, t):  # the data prediction DPM-Solver++ extrapolates
        alpha, sigma = ns.alpha_sigma(t)
        return (x - sigma * eps_fn(x, t)) / alpha

    def first_order(x, s, t, d_s):  # exact for a constant data prediction: DDIM
        (alpha_t, sigma_t), (_, sigma_s) = ns.alpha_sigma(t), ns.alpha_sigma(s)
        return (sigma_t / sigma_s) * x - alpha_t * math.expm1(ns.lam(s) - ns.lam(t)) * d_s

    def slope(d_s, d_r, s, r, t):  # (d_r - d_s) / rho, rho = (lambda_r - lambda_s) / (lambda_t - lambda_s)
        return (d_r - d_s) * ((ns.lam(t) - ns.lam(s)) / (ns.lam(r) - ns.lam(s)))

    def alpha_phi2(s, t):  # the slope's coefficient in a group's middle state and end
        h = ns.lam(t) - ns.lam(s)
        return ns.alpha_sigma(t)[0] * (math.expm1(-h) / h + 1.0)

    def half_alpha_phi1(s, t):  # ... and in a second-order step's end
        return -0.5 * ns.alpha_sigma(t)[0] * math.expm1(ns.lam(s) - ns.lam(t))

    i = 0
    for order in uvit_orders(steps):
        s, t = grid[i], grid[i + order]
        d_s = x0_at(x, s)
        if order == 1:
            x = first_order(x, s, t, d_s)
        elif order == 2:
            r = grid[i + 1]
            d_r = x0_at(first_order(x, s, r, d_s), r)
            x = first_order(x, s, t, d_s) + half_alpha_phi1(s, t) * slope(d_s, d_r, s, r, t)
        else:
            r1, r2 = grid[i + 1], grid[i + 2]
            d_1 = x0_at(first_order(x, s, r1, d_s), r1)
            x_2 = first_order(x, s, r2, d_s) + alpha_phi2(s, r2) * slope(d_s, d_1, s, r1, r2)
            d_2 = x0_at(x_2, r2)
            x = first_order(x, s, t, d_s) + alpha_phi2(s, t) * slope(d_s, d_2, s, r2, t)
        i += order
    return x


# ----------------------------------------------------------------------------------------- dpmpp2m

def make_scheduler(steps: int):
    from diffusers import DPMSolverMultistepScheduler  # only this path needs diffusers (slow to import)

    scheduler = DPMSolverMultistepScheduler(**SCHEDULER_KWARGS, algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    return scheduler


def solve_dpmpp2m(eps_fn: EpsFn, x: torch.Tensor, steps: int) -> torch.Tensor:
    """x at sigma 0 from x at label 999 with diffusers' multistep DPM-Solver++ (one evaluation per step).

    A fresh scheduler per call: `set_timesteps` resets its history, and concurrent calls (the attention
    analysis) stay independent.
    """
    scheduler = make_scheduler(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, int(t)), t, x).prev_sample
    return x


# ----------------------------------------------------------------------------------------- sample()

def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """[B, *latent_shape] float32 on CPU; row i depends on seeds[i] only."""
    return torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def check_solver(solver: str) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    return solver


@torch.no_grad()
def sample(model, context: torch.Tensor, null_context: torch.Tensor, *, steps: int = 50, scale: float = 1.0,
           seed: int = 0, seeds: Sequence[int] | None = None, latent_shape: Sequence[int] | None = None,
           attention_callback: AttentionCallback | None = None, solver: str = DEFAULT_SOLVER,
           prediction: str = "epsilon", normalization=None) -> torch.Tensor:
    """Model-space latents [B, C, S, S] (float32, what the codec decodes) for the text encodings `context`
    [B, T, D] as the shard set's encoder gives them.

    `null_context` [T, D] is the encoding of "". Image i starts from the noise of `seeds[i]`
    (default `seed + i`). `model` is any model(x_t, t, context) with the UViT signature, whose output is the
    `prediction` target ("epsilon" or "v"); `normalization` (train.normalization.Normalization, None: the
    identity) maps text states in and the samples out. `run.sampling()` gives both for a run directory. EMA
    weights in eval mode are the caller's choice (`train.checkpoint.load_run` gives them). `solver`: "uvit"
    (default) or "dpmpp2m", see the module doc.
    """
    check_solver(solver)
    device = context.device
    B = context.shape[0]
    seeds = list(range(seed, seed + B)) if seeds is None else list(seeds)
    if len(seeds) != B:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {B} prompts: pass one seed per prompt")
    if latent_shape is None:
        cfg = model.cfg
        latent_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)

    schedule = ContinuousSchedule()
    normalization = normalization or Normalization.identity()
    # Conditional first, unconditional second: the attention callback keeps the first half.
    both_contexts = normalization.text_in(torch.cat([context, null_context.to(context).expand(B, -1, -1)]))
    record = attention_callback is not None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    # diffusers' grid is integer (kept as long, as before); U-ViT's is fractional.
    label_dtype = torch.long if solver == "dpmpp2m" else torch.float32
    evaluations = 0

    def guided(x: torch.Tensor, t: float) -> torch.Tensor:
        nonlocal evaluations
        timesteps = torch.full((2 * B,), t, device=device, dtype=label_dtype)
        with autocast:
            out = model(torch.cat([x, x]), timesteps, both_contexts, record_attention=record)
        out, extras = out if record else (out, None)
        alpha, sigma = schedule.alpha_sigma(float(t))
        eps_cond, eps_uncond = eps_from_prediction(out.float(), torch.cat([x, x]), alpha, sigma,
                                                   prediction).chunk(2)
        if record:
            attention_callback(evaluations, t, {name: probs[:B] for name, probs in extras["attention"].items()})
        evaluations += 1
        return guided_eps(eps_cond, eps_uncond, scale)

    x = initial_noise(seeds, latent_shape).to(device)
    x = solve_uvit(guided, x, steps, schedule) if solver == "uvit" else solve_dpmpp2m(guided, x, steps)
    return normalization.image_out(x)
