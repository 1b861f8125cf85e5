"""The training loop: any variant of train.model on any shard set, top to bottom (docs/design.md, "Recipe").

One optimizer step:
  data     `grad_accum` micro-batches per rank; VAE moments are sampled and scaled on the device, captions
           are dropped to the "" encoding with torch.where (shapes never change, so nothing recompiles)
  inputs   images and text states through the run's normalisation (train/normalization.py; the identity
           for the paper's recipe)
  loss     MSE of the prediction target (epsilon | v), uniform or min-SNR weighted, on SD's scaled-linear
           schedule (train/diffusion.py, shared with the sampler), in bf16 autocast without a grad scaler
  update   AdamW (fused on CUDA), linear warm-up then constant; an fp32 EMA of the weights every step
Every `log_every` steps the loss is averaged over ranks and steps, checked for NaN/inf, and written to tqdm,
metrics.jsonl and TensorBoard; SIGTERM is honoured there too. Every `ckpt_every` steps, at the end and on
SIGTERM the whole state is checkpointed atomically; every `preview_every` steps the EMA model draws a grid
and the per-timestep diagnostic is measured (train/diagnostic.py).
The parts: RunState here (what a checkpoint holds), train/monitor.py (StopSignals, TrainLog, Previews),
train/data.py (the data stream), train/distributed.py (ranks, the folder lock), train/run_dir.py (the files).

Exact resume: each step's random draws come from a generator seeded by (seed, rank, step), and the data
stream is a deterministic function of its seed, re-seeded at every `ckpt_every` boundary; a checkpoint
stores that seed and how far into it the run was. A resumed run reproduces an uninterrupted run's losses
bit for bit (tests/test_train_loop.py).

Only torch is imported at module level: the shard reader (webdataset), tqdm, TensorBoard and matplotlib are
imported where the full loop needs them, so `train_step` and train.bench run on a bare GPU machine.
"""
from __future__ import annotations

import copy
import functools
import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

from ifvit.errors import BadConfig
from train.checkpoint import load_checkpoint
from train.config import MEANING_FIELDS, TrainConfig, default_preset, make_config
from train.data import DataStream
from train.diagnostic import Diagnostic
from train.diffusion import NoiseSchedule, diffusion_loss
from train.distributed import Dist, init_distributed
from train.model import ModelConfig, UViT, count_params, variant_config, variant_name
from train.monitor import NonFiniteLoss, Previews, StopSignals, TrainLog
from train.normalization import Normalization
from train.run_dir import RunDir

# Dense bf16 peak of one device (TFLOP/s) for MFU; the first name contained in the device's name wins.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("A100", 312),
                    ("RTX 4090", 165))


def peak_flops(device: torch.device) -> float | None:
    """Per-device bf16 peak in FLOP/s, or None (a CPU, or a GPU missing from the table: MFU is then null)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


# --- set-up -----------------------------------------------------------------------------------------------

def model_config(variant: str, cfg: TrainConfig, data: dict, n_text: int | None = None,
                 n_image: int | None = None) -> ModelConfig:
    """The variant, sized by the preset, shaped by the data (channels, resolution, text length/width).

    A preset with fewer blocks than the paper's 13 keeps the paper's *fraction* of image-only blocks
    (4 of 6 per side) unless --n-image says otherwise, so intermediate fusion stays intermediate
    (train.model.variant_config).
    """
    return variant_config(variant, n_text=n_text, n_image=n_image, width=cfg.width, depth=cfg.depth,
                          heads=cfg.heads, patch_size=cfg.patch_size, **data)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # Weight decay on every parameter, as U-ViT does. Fused: one kernel for all parameters on CUDA.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr_at(1), betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay, fused=device.type == "cuda")


def enable_activation_checkpointing(model: UViT) -> None:
    """Recompute every block in the backward pass instead of storing its activations.

    Done by rebinding each block's forward rather than wrapping the modules, so parameter names (and thus
    checkpoints) stay the same; recomputation is deterministic, so results are identical.
    """
    for block in [*model.text_blocks, *model.in_blocks, model.mid_block, *model.out_blocks]:
        block.forward = functools.partial(recompute, block.forward, use_reentrant=False)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Every random draw of one step (moments, caption dropout, timesteps, noise) comes from here, so the
    draws of step s are the same whether or not the run was interrupted before it."""
    # Hashed because the CPU generator (mt19937) keeps only the low 32 bits of its seed.
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little"))


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    # Not torch.optim.swa_utils.AveragedModel: it reads its update counter on the host at every update,
    # a GPU sync per step. One foreach lerp over all parameters does the same without one.
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# --- one step ----------------------------------------------------------------------------------------------

def draw_step_inputs(x0: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor, gen: torch.Generator, *,
                     caption_dropout: float, schedule: NoiseSchedule):
    """(context, t, eps) for clean inputs x0, every draw from `gen`. Dropped captions become the "" encoding
    through torch.where, so the batch keeps its shape."""
    b, device = x0.shape[0], x0.device
    drop = torch.rand(b, device=device, generator=gen) < caption_dropout
    context = torch.where(drop[:, None, None], null_text, text.float())
    t = schedule.sample_timesteps(b, generator=gen, device=device)
    eps = torch.randn(x0.shape, device=device, generator=gen)
    return context, t, eps


def train_step(model, optimizer, schedule: NoiseSchedule, x0, context, t, eps, *, lr: float,
               grad_accum: int = 1, autocast_dtype: torch.dtype | None = None, prediction: str = "epsilon",
               weighting: str = "uniform", gamma: float = 5.0) -> torch.Tensor:
    """One optimizer step over the rank's batch, split into `grad_accum` micro-batches. Returns the mean
    loss as a detached device tensor (reading it would sync, so the caller decides when)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    device_type = x0.device.type
    total = torch.zeros((), device=x0.device)
    micro = zip(*(a.chunk(grad_accum) for a in (x0, context, t, eps)))
    for i, (x0_i, context_i, t_i, eps_i) in enumerate(micro):
        # DDP all-reduces gradients only on the last micro-batch.
        last = i == grad_accum - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                loss = diffusion_loss(model, x0_i, context_i, schedule, t_i, eps_i, prediction=prediction,
                                      weighting=weighting, gamma=gamma)
            (loss / grad_accum).backward()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


# --- the run -----------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    model: UViT  # the raw (unwrapped) trained model, on its device
    ema: UViT
    stopped: str  # "finished" | "sigterm"
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # per log step: step, loss (all ranks), loss_local


SHAPE_FIELDS = ("width", "depth", "heads", "patch_size")


def resolve_configs(variant, shard_set, saved: dict | None, preset, overrides, n_text, n_image,
                    cuda) -> tuple[TrainConfig, ModelConfig]:
    """(TrainConfig, ModelConfig): a new run starts from the preset the shard set implies; a resumed one
    keeps its saved configuration (overrides on top) and refuses a request for another model."""
    data = dict(in_chans=shard_set.latent_channels, img_size=shard_set.latent_size,
                text_len=shard_set.text_len, text_dim=shard_set.text_dim)
    if saved is None:
        cfg = make_config(preset or default_preset(shard_set.latent_format, cuda), **overrides)
        return cfg, model_config(variant, cfg, data, n_text, n_image)
    fix = "use a new --out to start another run"
    if "converted_from" in saved:  # train.convert writes weights only: no optimizer, data or RNG state to resume
        raise BadConfig(f"this run directory holds a network converted from {saved['converted_from']['source']} "
                        f"(python -m train.convert), which cannot be resumed: {fix}")
    if preset and preset != saved["train"]["preset"]:
        raise BadConfig(f"this run directory was trained with preset {saved['train']['preset']}: {fix}")
    changed = [f"--{k.replace('_', '-')}" for k in SHAPE_FIELDS if k in overrides
               and overrides[k] != saved["train"].get(k)]
    if changed:
        raise BadConfig(f"{' '.join(changed)} would change the model this run directory holds: {fix}")
    saved_cfg = TrainConfig(**saved["train"])  # runs from before a field existed get its default: the paper's
    changed = [f"--{k.replace('_', '-')}" for k in MEANING_FIELDS if k in overrides
               and overrides[k] != getattr(saved_cfg, k)]
    if changed:
        raise BadConfig(f"{' '.join(changed)} would change what this run's weights mean (they were trained with "
                        + ", ".join(f"{k} {getattr(saved_cfg, k)}" for k in MEANING_FIELDS) + f"): {fix}")
    cfg = replace(saved_cfg, **overrides)
    mcfg = ModelConfig(**saved["model"])
    wanted = model_config(variant, cfg, data, n_text, n_image)
    if (variant_name(wanted), wanted.n_text, wanted.n_image) != (variant_name(mcfg), mcfg.n_text, mcfg.n_image):
        raise BadConfig(f"this run directory holds a {variant_name(mcfg)} model ([n_text, n_image] = "
                        f"[{mcfg.n_text}, {mcfg.n_image}]), not {variant_name(wanted)}: {fix}")
    return cfg, mcfg


def new_run_normalization(shard_set, cfg: TrainConfig) -> Normalization:
    """The identity for the paper's recipe; else built from the shard set's statistics (computed once and
    kept in the set if it has none yet: pipeline.statistics)."""
    if cfg.image_norm == "scale" and cfg.text_norm == "none":
        return Normalization.identity()
    from pipeline.statistics import ensure_statistics

    return Normalization.from_statistics(ensure_statistics(shard_set), cfg.image_norm, cfg.text_norm)


@dataclass
class RunState:
    """What a checkpoint holds and the loop advances: the model, its EMA, the optimizer, the data stream."""
    run: RunDir
    cfg: TrainConfig
    mcfg: ModelConfig
    model: UViT  # unwrapped (compiled in place)
    net: torch.nn.Module  # what the step calls: the model, or DDP around it
    ema: UViT
    optimizer: torch.optim.Optimizer
    stream: DataStream
    step: int
    autocast_dtype: torch.dtype | None
    dist: Dist
    norm: Normalization  # how images and text states are scaled for the network (saved with the run)

    @classmethod
    def start(cls, variant, shards, shard_set, out: Path, dist: Dist, preset, overrides, n_text,
              n_image) -> "RunState":
        """A new run in `out` on the shard set at `shards`, or the run `out` holds resumed from its latest
        checkpoint."""
        device = dist.device
        latest = out / "checkpoints" / "latest.pt"
        ckpt = load_checkpoint(latest) if latest.exists() else None
        cfg, mcfg = resolve_configs(variant, shard_set, ckpt and ckpt["config"], preset, overrides, n_text,
                                    n_image, device.type == "cuda")
        per_rank, rem = divmod(cfg.batch_size, dist.world * cfg.grad_accum)
        if rem or not per_rank:
            raise BadConfig(f"batch_size {cfg.batch_size} does not split over {dist.world} ranks x grad_accum "
                            f"{cfg.grad_accum}: pick a batch_size that is a multiple of {dist.world * cfg.grad_accum}")
        config = {**(ckpt["config"] if ckpt else {}), "model": mcfg.to_dict(), "train": cfg.to_dict()}
        run = RunDir.create(out, config, shards=shards) if dist.master else RunDir(out, config, shards)
        norm = new_run_normalization(shard_set, cfg) if ckpt is None else run.normalization()
        if ckpt is None and dist.master and not norm.is_identity:
            norm.save(out)
        autocast_dtype = {"bf16": torch.bfloat16, "fp32": None}.get(
            cfg.precision, torch.bfloat16 if device.type == "cuda" else None)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        # Model, EMA (an fp32 copy, never compiled), optimizer; then compile in place, then DDP.
        torch.manual_seed(cfg.seed)
        model = UViT(mcfg).to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = build_optimizer(model, cfg, device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"].cpu())
            if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if cfg.compile if cfg.compile is not None else device.type == "cuda":
            model.compile()
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  gradient_as_bucket_view=True) if dist.world > 1 else model
        stream = DataStream(shard_set, micro_batch=per_rank // cfg.grad_accum, grad_accum=cfg.grad_accum,
                            seed=cfg.seed, num_workers=cfg.num_workers, device=device)
        if ckpt is not None:
            stream.load_state_dict(ckpt["data"])
        else:
            stream.reseed(0)
        return cls(run, cfg, mcfg, model, net, ema, optimizer, stream, ckpt["step"] if ckpt else 0,
                   autocast_dtype, dist, norm)

    def describe(self, label: str, flops_per_forward: float) -> str:
        cfg, d = self.cfg, self.dist
        return (f"{label}: {count_params(self.model):,} parameters, {flops_per_forward / 1e9:.3f} GFLOPs/forward "
                f"(true), preset {cfg.preset}, {d.world} x {d.device.type}, batch {cfg.batch_size} "
                f"({cfg.batch_size // d.world // cfg.grad_accum} x {cfg.grad_accum} accum per rank), "
                f"{'bf16' if self.autocast_dtype else 'fp32'}, compile "
                f"{'on' if (cfg.compile if cfg.compile is not None else d.device.type == 'cuda') else 'off'}"
                + (f"; resuming from step {self.step}" if self.step else ""))

    def save(self, step: int) -> Path | None:
        """Checkpoint the whole state at `step` (rank 0); refuses weights that went non-finite."""
        if not self.dist.master:
            return None
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLoss(f"weights became non-finite before step {step}: not saving them")
        cuda = self.dist.device.type == "cuda"
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "step": step, "data": self.stream.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}}
        return self.run.save_checkpoint(state, keep=self.cfg.keep_checkpoints)


def train(variant: str, shards: str | Path, out: str | Path, *, preset: str | None = None,
          overrides: dict | None = None, n_text: int | None = None, n_image: int | None = None) -> TrainResult:
    """Train `variant` on the shard set at `shards` into the run directory `out` (docs/CONTRACTS.md §4),
    resuming from `out`'s latest checkpoint when there is one. `overrides` are TrainConfig fields.
    The run directory is locked for the whole run (a second job into it stops at once)."""
    from pipeline.reader import ShardSet, to_model_input
    from train.flops import true_flops

    out, overrides = Path(out), overrides or {}
    dist = init_distributed(overrides.get("device", "auto"))
    shard_set = ShardSet(shards)
    with dist.exclusive(out, f"python -m train --variant {variant} --out {out}"), StopSignals() as stop:
        state = RunState.start(variant, shards, shard_set, out, dist, preset, overrides, n_text, n_image)
        cfg, start, label, norm = state.cfg, state.step, state.run.variant, state.norm
        schedule, null_text = NoiseSchedule(dist.device), norm.text_in(shard_set.null_text().to(dist.device))
        ema_params, params = list(state.ema.parameters()), list(state.model.parameters())
        flops = true_flops(state.mcfg)
        log = TrainLog(state.run, cfg, dist, start=start, flops_per_sample=3 * flops,  # forward + backward
                       peak_flops=peak_flops(dist.device), label=label)
        previews = Previews(state.run, shard_set, cfg, dist, state.autocast_dtype, label, log.say, norm)
        diagnostic = (Diagnostic(shard_set, norm, cfg.prediction, dist.device, every=cfg.preview_every,
                                 total_steps=cfg.steps, autocast_dtype=state.autocast_dtype)
                      if dist.master and cfg.preview_every else None)
        log.say(state.describe(label, flops))
        if start >= cfg.steps:
            log.say(f"{label}: the run is already at step {start} of {cfg.steps}: nothing to do "
                    "(--steps N trains it further)")

        last_saved, stopped, step = None, "finished", start
        try:
            for step in range(start + 1, cfg.steps + 1):
                latent, text = state.stream.next()
                gen = step_generator(cfg.seed, dist.rank, step, dist.device)
                # VAE moments -> a latent sample, times the latent scale (pixels pass through), on the device.
                x0 = to_model_input(latent, shard_set.latent_format, shard_set.latent_scale, generator=gen).float()
                x0, text = norm.image_in(x0), norm.text_in(text.float())
                context, t, eps = draw_step_inputs(x0, text, null_text, gen, caption_dropout=cfg.caption_dropout,
                                                   schedule=schedule)
                if step == cfg.inject_nan_at_step:
                    x0 = x0 * float("nan")  # a debugging aid: a poisoned batch, as bad data would give
                loss = train_step(state.net, state.optimizer, schedule, x0, context, t, eps, lr=cfg.lr_at(step),
                                  grad_accum=cfg.grad_accum, autocast_dtype=state.autocast_dtype,
                                  prediction=cfg.prediction, weighting=cfg.loss_weighting, gamma=cfg.min_snr_gamma)
                update_ema(ema_params, params, cfg.ema_decay)
                log.add(loss)

                checkpoint_due = step % cfg.ckpt_every == 0 or step == cfg.steps
                if step % cfg.ckpt_every == 0:
                    state.stream.reseed(step)  # before saving, so the checkpoint starts the next segment
                if step % cfg.log_every and not checkpoint_due:
                    continue
                diag = diagnostic.measure(state.ema) if diagnostic and diagnostic.due(step) else None
                stops = log.flush(step, stop.requested, diag)  # the sync point: loss over ranks, NaN check, stops
                if checkpoint_due or stops:
                    last_saved = state.save(step) or last_saved
                if previews.due(step):
                    previews.draw(state.ema, step, log.writer)
                if stops:
                    stopped = "sigterm"
                    log.say(f"stop requested: checkpoint at step {step} written; re-run the same command to resume")
                    break
        finally:
            log.close()
        log.summary(step, stopped, last_saved, previews.last)
    return TrainResult(step, state.model, state.ema, stopped, last_saved, log.history)
