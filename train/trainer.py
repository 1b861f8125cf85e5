"""The training loop: any variant of train.model on any shard set, top to bottom (DESIGN.md §7, §8).

One optimizer step:
  data     `grad_accum` micro-batches per rank; VAE moments are sampled and scaled on the device, captions
           are dropped to the "" encoding with torch.where (shapes never change, so nothing recompiles)
  loss     eps-prediction MSE on SD's scaled-linear schedule (train/diffusion.py, shared with the sampler),
           in bf16 autocast without a grad scaler (bf16 has fp32's exponent range)
  update   AdamW (fused on CUDA), linear warm-up then constant; an fp32 EMA of the weights every step
Every `log_every` steps the loss is averaged over ranks and steps, checked for NaN/inf, and written to tqdm,
metrics.jsonl and TensorBoard; SIGTERM is honoured there too. Every `ckpt_every` steps, at the end and on
SIGTERM the whole state is checkpointed atomically; every `preview_every` steps the EMA model draws a grid.

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
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint as recompute

from train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from train.config import TrainConfig, default_preset, make_config
from train.diffusion import NoiseSchedule, eps_loss
from train.model import ModelConfig, UViT, count_params, variant_config
from train.preview import ddim_sample, grid_figure, pixels_to_uint8, save_figure

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

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on GPUs, gloo on CPUs; a plain run is one process."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not cuda:
        raise RuntimeError("device=cuda but torch sees no GPU: pass --device cpu (or auto) or fix the CUDA install")
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def model_config(variant: str, cfg: TrainConfig, data: dict, n_text: int | None = None,
                 n_image: int | None = None) -> ModelConfig:
    """The variant, sized by the preset, shaped by the data (channels, resolution, text length/width).

    A preset with fewer blocks than the paper's 13 keeps the paper's *fraction* of image-only blocks
    (4 of 6 per side) unless --n-image says otherwise, so intermediate fusion stays intermediate.
    """
    base = variant_config(variant)
    depth = cfg.depth or base.depth
    if n_image is None and base.fusion == "intermediate" and depth != base.depth:
        n_image = round(base.n_image * (depth // 2) / (base.depth // 2))
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
               grad_accum: int = 1, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
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
                loss = eps_loss(model, x0_i, context_i, schedule, t_i, eps_i)
            (loss / grad_accum).backward()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


# --- data --------------------------------------------------------------------------------------------------

def _ignore_stop_signals(worker_id: int, then=None) -> None:
    """Loader workers ignore SIGTERM and SIGINT. Job schedulers (and Ctrl-C) signal the whole process group,
    and a torch loader worker dies on a SIGTERM that does not come from its parent, which would abort the
    main process mid-step; the main process alone handles the signal, by checkpointing."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


class DataStream:
    """Training batches as a deterministic function of (segment seed, position), so resume is exact.

    The reader's stream is reproducible for a given seed, but re-reading a whole run's stream to reach a
    resume point would cost as much loading as the run itself. So the stream is re-seeded at every
    checkpoint boundary: resuming from a regular checkpoint opens a fresh segment, and resuming from a
    SIGTERM checkpoint skips at most one segment's worth of batches.
    """

    def __init__(self, shard_set, *, micro_batch: int, grad_accum: int, seed: int, num_workers: int,
                 device: torch.device):
        self.shard_set, self.micro_batch, self.grad_accum = shard_set, micro_batch, grad_accum
        self.seed, self.num_workers, self.device = seed, num_workers, device
        self.segment_seed, self.consumed, self._batches = None, 0, None

    def reseed(self, step: int) -> None:
        self._open(self.seed * 1_000_003 + step, skip=0)

    def state_dict(self) -> dict:
        return {"segment_seed": self.segment_seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self._open(state["segment_seed"], skip=state["consumed"])

    def _open(self, segment_seed: int, skip: int) -> None:
        self._batches = None  # shut the previous loader's workers down first
        loader = self.shard_set.loader("train", batch_size=self.micro_batch, seed=segment_seed,
                                       num_workers=self.num_workers, resampled=True)
        torch_loader = getattr(loader, "pipeline", [loader])[0]  # wds.WebLoader: a torch DataLoader, then stages
        if isinstance(torch_loader, torch.utils.data.DataLoader):
            torch_loader.worker_init_fn = functools.partial(_ignore_stop_signals, then=torch_loader.worker_init_fn)
        self._batches = iter(loader)
        for _ in range(skip):
            next(self._batches)
        self.segment_seed, self.consumed = segment_seed, skip

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent, text) of one optimizer step, all micro-batches concatenated, on the device."""
        micro = [next(self._batches) for _ in range(self.grad_accum)]
        self.consumed += self.grad_accum
        latent = torch.cat([m["latent"] for m in micro])
        text = torch.cat([m["text"] for m in micro])
        return latent.to(self.device, non_blocking=True), text.to(self.device, non_blocking=True)


def preview_prompts(shard_set, n: int) -> tuple[list[str], torch.Tensor]:
    """The first caption of the first `n` val records (train when there is no val split) and its encoding."""
    split = "val" if "val" in shard_set.splits else "train"
    captions, texts = [], []
    for record in shard_set.records(split):
        captions.append(record["json"]["captions"][0])
        texts.append(torch.as_tensor(record["text"][0]).float())
        if len(captions) == n:
            break
    return captions, torch.stack(texts)


# --- the run -----------------------------------------------------------------------------------------------

class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    model: UViT  # the raw (unwrapped) trained model, on its device
    ema: UViT
    stopped: str  # "finished" | "sigterm"
    checkpoint: Path | None
    history: list[dict] = field(default_factory=list)  # per log step: step, loss (all ranks), loss_local


def _resolve_config(variant, shard_set, ckpt, preset, overrides, n_text, n_image, cuda):
    """(TrainConfig, ModelConfig): a resumed run keeps its saved configuration (overrides on top);
    a new one starts from the preset the shard set implies."""
    data = dict(in_chans=shard_set.latent_channels, img_size=shard_set.latent_size,
                text_len=shard_set.text_len, text_dim=shard_set.text_dim)
    if ckpt is None:
        cfg = make_config(preset or default_preset(shard_set.latent_format, cuda), **overrides)
        return cfg, model_config(variant, cfg, data, n_text, n_image)
    saved = ckpt["config"]
    fix = "use a new --out to start another run"
    if saved["variant"] != variant:
        raise ValueError(f"this run directory holds a {saved['variant']} run, not {variant}: {fix}")
    if preset and preset != saved["train"]["preset"]:
        raise ValueError(f"this run directory was trained with preset {saved['train']['preset']}: {fix}")
    mcfg = ModelConfig(**saved["model"])
    for name, value in (("n_text", n_text), ("n_image", n_image)):
        if value is not None and value != getattr(mcfg, name):
            raise ValueError(f"this run directory holds a model with {name}={getattr(mcfg, name)}: {fix}")
    return replace(TrainConfig(**saved["train"]), **overrides), mcfg


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint (they are about to be redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= upto_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def train(variant: str, shards: str | Path, out: str | Path, *, preset: str | None = None,
          overrides: dict | None = None, n_text: int | None = None, n_image: int | None = None) -> TrainResult:
    """Train `variant` on the shard set at `shards` into the run directory `out` (docs/CONTRACTS.md §4),
    resuming from `out`'s latest checkpoint when there is one. `overrides` are TrainConfig fields."""
    from tqdm.auto import tqdm

    from pipeline.reader import ShardSet, to_model_input

    out = Path(out)
    overrides = overrides or {}
    ddp = init_distributed(overrides.get("device", "auto"))
    device = ddp.device
    shard_set = ShardSet(shards)
    latest = out / "checkpoints" / "latest.pt"
    ckpt = load_checkpoint(latest) if latest.exists() else None
    cfg, mcfg = _resolve_config(variant, shard_set, ckpt, preset, overrides, n_text, n_image, device.type == "cuda")
    config = {"variant": variant, "model": mcfg.to_dict(), "train": cfg.to_dict(), "shards": str(shards)}

    def say(message: str) -> None:
        if ddp.master:
            tqdm.write(message)

    per_rank, rem = divmod(cfg.batch_size, ddp.world * cfg.grad_accum)
    if rem or not per_rank:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {ddp.world} ranks x grad_accum "
                         f"{cfg.grad_accum}: pick a batch_size that is a multiple of {ddp.world * cfg.grad_accum}")
    autocast_dtype = {"bf16": torch.bfloat16, "fp32": None}.get(cfg.precision,
                                                                 torch.bfloat16 if device.type == "cuda" else None)
    compile_model = cfg.compile if cfg.compile is not None else device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Model, EMA (an fp32 copy, never compiled), optimizer; then compile in place, then DDP.
    torch.manual_seed(cfg.seed)
    model = UViT(mcfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model, cfg, device)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
        start = ckpt["step"]
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if compile_model:
        model.compile()
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              gradient_as_bucket_view=True) if ddp.world > 1 else model
    ema_params, params = list(ema.parameters()), list(model.parameters())
    schedule = NoiseSchedule(device)
    null_text = shard_set.null_text().to(device)

    # SIGTERM (and Ctrl-C) ask for a checkpoint at the next log step (loader workers ignore them).
    stop_requested = False

    def request_stop(signum, frame):
        nonlocal stop_requested
        if stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        stop_requested = True

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    stream = DataStream(shard_set, micro_batch=per_rank // cfg.grad_accum, grad_accum=cfg.grad_accum,
                        seed=cfg.seed, num_workers=cfg.num_workers, device=device)
    if ckpt is not None:
        stream.load_state_dict(ckpt["data"])
    else:
        stream.reseed(0)
    del ckpt  # the optimizer state can be large

    # Logging (rank 0): metrics.jsonl, TensorBoard, tqdm; previews from fixed val prompts.
    from train.flops import true_flops

    train_flops_per_sample = 3 * true_flops(mcfg)  # forward + backward (2x forward)
    peak = peak_flops(device)
    metrics_path, writer, preview = out / "metrics.jsonl", None, None
    if ddp.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _rewrite_metrics(metrics_path, start)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(out / "tb", purge_step=start + 1)
        if cfg.preview_every:
            captions, prompt_text = preview_prompts(shard_set, cfg.preview_prompts)
            preview = (captions, prompt_text.to(device))
    say(f"{variant}: {count_params(model):,} parameters, {train_flops_per_sample / 3e9:.3f} GFLOPs/forward "
        f"(true), preset {cfg.preset}, {ddp.world} x {device.type}, batch {cfg.batch_size} "
        f"({per_rank // cfg.grad_accum} x {cfg.grad_accum} accum per rank), "
        f"{'bf16' if autocast_dtype else 'fp32'}, compile {'on' if compile_model else 'off'}"
        + (f"; resuming from step {start}" if start else ""))

    def save(step: int) -> Path | None:
        if not ddp.master:
            return None
        if not all(torch.isfinite(p).all() for p in params):
            raise NonFiniteLoss(f"weights became non-finite before step {step}: not saving them")
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "config": config, "data": stream.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}}
        return save_checkpoint(out, state, keep=cfg.keep_checkpoints)

    decode, last_preview = None, 0  # decode is built at the first preview (for a VAE set: loads the VAE)

    def draw_preview(step: int) -> None:
        nonlocal preview, decode, last_preview
        captions, prompt_text = preview
        try:
            if decode is None:
                decode = (functools.partial(pixels_to_uint8, scale=shard_set.latent_scale)
                          if shard_set.latent_format == "pixels" else shard_set.image_codec(device).decode)
            x = ddim_sample(ema, prompt_text, null_text, seeds=list(range(len(captions))),
                            steps=cfg.preview_steps, scale=cfg.preview_scale, autocast_dtype=autocast_dtype)
            with torch.no_grad():
                images = decode(x)
        except Exception as exc:  # a missing VAE must not end a long run: report it and stop previewing
            say(f"previews disabled ({type(exc).__name__}: {exc}); for a VAE shard set, install diffusers and "
                f"make the manifest's VAE reachable; --preview-every 0 turns previews off")
            preview = None
            return
        fig = grid_figure(images, captions, title=f"{variant} step {step} (EMA, DDIM {cfg.preview_steps}, "
                                                  f"scale {cfg.preview_scale:g})")
        save_figure(fig, out / "previews" / f"step_{step:08d}.png")
        writer.add_figure("preview", fig, step)
        last_preview = step

    # The loop.
    history, last_saved, stopped = [], None, "finished"
    window_loss, window_steps, window_start, first_loss = torch.zeros((), device=device), 0, time.perf_counter(), None
    run_start, rank = time.perf_counter(), ddp.rank
    bar = tqdm(total=cfg.steps, initial=start, disable=not ddp.master, desc=variant, dynamic_ncols=True)
    step = start
    try:
        for step in range(start + 1, cfg.steps + 1):
            latent, text = stream.next()
            gen = step_generator(cfg.seed, rank, step, device)
            # VAE moments -> a latent sample, times the latent scale (pixels pass through), on the device.
            x0 = to_model_input(latent, shard_set.latent_format, shard_set.latent_scale, generator=gen).float()
            context, t, eps = draw_step_inputs(x0, text, null_text, gen, caption_dropout=cfg.caption_dropout,
                                               schedule=schedule)
            if step == cfg.inject_nan_at_step:
                x0 = x0 * float("nan")  # a debugging aid: a poisoned batch, as bad data would give
            loss = train_step(net, optimizer, schedule, x0, context, t, eps, lr=cfg.lr_at(step),
                              grad_accum=cfg.grad_accum, autocast_dtype=autocast_dtype)
            update_ema(ema_params, params, cfg.ema_decay)
            window_loss += loss
            window_steps += 1
            bar.update()

            checkpoint_due = step % cfg.ckpt_every == 0 or step == cfg.steps
            if step % cfg.ckpt_every == 0:
                stream.reseed(step)  # before saving, so the checkpoint starts the next segment
            if step % cfg.log_every and not checkpoint_due:
                continue

            # Sync point: one all-reduce carries the loss sum, the step count and any stop request.
            local = window_loss / window_steps
            stats = torch.stack([window_loss, local.new_tensor(float(window_steps)),
                                 local.new_tensor(float(stop_requested))])
            if ddp.world > 1:
                dist.all_reduce(stats)
            loss_sum, n, stops = stats.tolist()
            loss_mean, local_loss = loss_sum / n, local.item()
            if not math.isfinite(loss_mean):
                good = list_checkpoints(out)
                raise NonFiniteLoss(
                    f"loss became {loss_mean} between steps {step - window_steps + 1} and {step}; stopped "
                    f"without saving. Last good checkpoint: "
                    f"{good[-1][1] if good else 'none (nothing saved yet)'} (kept). Resuming replays the same "
                    f"steps exactly, so re-run the command with a change: a lower --lr or a longer "
                    f"--warmup-steps (flags override the saved configuration), or fixed data.")
            elapsed = time.perf_counter() - window_start
            steps_per_s = window_steps / elapsed
            samples_per_s = steps_per_s * cfg.batch_size
            record = {"step": step, "loss": loss_mean, "lr": cfg.lr_at(step), "steps_per_s": steps_per_s,
                      "samples_per_s": samples_per_s,
                      "mfu": train_flops_per_sample * samples_per_s / (peak * ddp.world) if peak else None,
                      "elapsed_s": time.perf_counter() - run_start}
            history.append({"step": step, "loss": loss_mean, "loss_local": local_loss})
            first_loss = first_loss if first_loss is not None else loss_mean
            if ddp.master:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                for key in ("loss", "lr", "steps_per_s", "samples_per_s", "mfu"):
                    if record[key] is not None:
                        writer.add_scalar(f"train/{key}", record[key], step)
                bar.set_postfix_str(f"loss {loss_mean:.4f} | {steps_per_s:.2f} steps/s | "
                                    f"{samples_per_s:.0f} samples/s"
                                    + (f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else ""))
            window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.perf_counter()

            if checkpoint_due or stops:
                last_saved = save(step) or last_saved
            if preview is not None and ddp.master and (step % cfg.preview_every == 0 or step == cfg.steps):
                draw_preview(step)
            if stops:
                stopped = "sigterm"
                say(f"stop requested: checkpoint at step {step} written; re-run the same command to resume")
                break
    finally:
        bar.close()
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        if writer is not None:
            writer.close()

    if ddp.master and history:
        seconds = time.perf_counter() - run_start
        done = step - start
        say(f"\n{variant} [{cfg.preset}] {stopped} at step {step}/{cfg.steps}: {done} steps in {seconds / 60:.1f} min "
            f"({done / seconds:.2f} steps/s, {done * cfg.batch_size / seconds:.0f} samples/s)\n"
            f"  loss      {first_loss:.4f} (first log) -> {history[-1]['loss']:.4f} (last)\n"
            f"  checkpoint {last_saved}\n"
            f"  metrics   {metrics_path}   (tensorboard --logdir {out / 'tb'})\n"
            + (f"  previews  {out / 'previews'}/ (newest: step_{last_preview:08d}.png)\n" if last_preview else ""))
    return TrainResult(step, model, ema, stopped, last_saved, history)
