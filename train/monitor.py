"""What the training loop reports and listens to, each in one named part (the loop is train/trainer.py):

    StopSignals   SIGTERM / Ctrl-C ask for a checkpoint at the next log step (a second Ctrl-C stops at once)
    TrainLog      loss window -> one all-reduce per log step (mean loss, step count, stop votes), the NaN
                  check, metrics.jsonl, TensorBoard, the tqdm bar, and the closing summary (rank 0)
    Previews      the EMA model's grid on fixed val captions every `preview_every` steps (rank 0)

Torch only at import time; tqdm, TensorBoard and matplotlib are imported when a real run starts them.
"""
from __future__ import annotations

import functools
import math
import signal
import time

import torch
import torch.distributed as torch_dist

from ifvit.errors import JobFailed
from train.diagnostic import bucket_bounds, table as diagnostic_table, worse_than_baseline
from train.preview import ddim_sample, grid_figure, pixels_to_uint8, save_figure


class NonFiniteLoss(JobFailed):
    pass


class StopSignals:
    """Within the block, SIGTERM and SIGINT set `requested` instead of killing the process (job schedulers
    signal the whole process group; the loader workers ignore them, see train/data.py)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.requested = True

    def __enter__(self) -> "StopSignals":
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TrainLog:
    """Loss bookkeeping between log steps and everything written about them (metrics on rank 0 only)."""

    def __init__(self, run, cfg, dist, *, start: int, flops_per_sample: float, peak_flops: float | None,
                 label: str):
        from tqdm.auto import tqdm

        self.run, self.cfg, self.dist, self.start, self.label = run, cfg, dist, start, label
        self.flops_per_sample, self.peak = flops_per_sample, peak_flops
        self.history: list[dict] = []  # per log step: step, loss (all ranks), loss_local
        self.first_loss = None
        self.last_diagnostic: tuple[int, dict] | None = None
        self.writer = None
        if dist.master:
            from torch.utils.tensorboard import SummaryWriter

            run.truncate_metrics(start)
            self.writer = SummaryWriter(run.tb_dir, purge_step=start + 1)
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not dist.master, desc=label, dynamic_ncols=True)
        self.run_start = time.perf_counter()
        self._reset()

    def say(self, message: str) -> None:
        if self.dist.master:
            self.bar.write(message)

    def _reset(self) -> None:
        self.window_loss = torch.zeros((), device=self.dist.device)
        self.window_steps, self.window_start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        """One step's loss (a device tensor: no sync here)."""
        self.window_loss += loss
        self.window_steps += 1
        self.bar.update()

    def flush(self, step: int, stop_requested: bool, diagnostic: dict | None = None) -> bool:
        """The sync point of a log step: one all-reduce carries the loss sum, the step count and the stop
        requests of every rank. Stops the run on a non-finite loss; returns whether any rank asked to stop.
        `diagnostic` (rank 0, at preview steps): train.diagnostic's per-bucket lists, logged in the same row."""
        local = self.window_loss / self.window_steps
        stats = torch.stack([self.window_loss, local.new_tensor(float(self.window_steps)),
                             local.new_tensor(float(stop_requested))])
        if self.dist.world > 1:
            torch_dist.all_reduce(stats)
        loss_sum, n, stops = stats.tolist()
        loss_mean, local_loss = loss_sum / n, local.item()
        if not math.isfinite(loss_mean):
            good = self.run.checkpoints()
            raise NonFiniteLoss(
                f"loss became {loss_mean} between steps {step - self.window_steps + 1} and {step}; stopped "
                f"without saving. Last good checkpoint: {good[-1][1] if good else 'none (nothing saved yet)'} "
                "(kept). Resuming replays the same steps exactly, so re-run the command with a change: a lower "
                "--lr or a longer --warmup-steps (flags override the saved configuration), or fixed data.")
        cfg = self.cfg
        steps_per_s = self.window_steps / (time.perf_counter() - self.window_start)
        samples_per_s = steps_per_s * cfg.batch_size
        record = {"step": step, "loss": loss_mean, "lr": cfg.lr_at(step), "steps_per_s": steps_per_s,
                  "samples_per_s": samples_per_s,
                  "mfu": (self.flops_per_sample * samples_per_s / (self.peak * self.dist.world)
                          if self.peak else None),
                  "elapsed_s": time.perf_counter() - self.run_start, **(diagnostic or {})}
        self.history.append({"step": step, "loss": loss_mean, "loss_local": local_loss})
        self.first_loss = loss_mean if self.first_loss is None else self.first_loss
        if self.dist.master:
            self.run.append_metrics([record])
            for key in ("loss", "lr", "steps_per_s", "samples_per_s", "mfu"):
                if record[key] is not None:
                    self.writer.add_scalar(f"train/{key}", record[key], step)
            if diagnostic:
                self._diagnostic(step, diagnostic)
            self.bar.set_postfix_str(f"loss {loss_mean:.4f} | {steps_per_s:.2f} steps/s | {samples_per_s:.0f} "
                                     "samples/s" + (f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None
                                                    else ""))
        self._reset()
        return bool(stops)

    def _diagnostic(self, step: int, diag: dict) -> None:
        for key, values in diag.items():
            self.writer.add_scalars(f"diagnostic/{key}", {f"t{bucket_bounds(b)[0]:03d}": v
                                                          for b, v in enumerate(values)}, step)
        self.last_diagnostic = (step, diag)
        worse = worse_than_baseline(diag)
        if worse and step > self.cfg.warmup_steps:
            self.say(f"warning: at step {step} the model's x0 error is worse than predicting the mean image for t in "
                     + ", ".join("[{}, {})".format(*bucket_bounds(b)) for b in worse)
                     + ": samples will not follow their captions there (docs/training.md, \"The diagnostic\")")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def summary(self, step: int, stopped: str, checkpoint, last_preview: int) -> None:
        """The closing lines (rank 0): what was done, how fast, where everything is."""
        if not (self.dist.master and self.history):
            return
        seconds, done, run = time.perf_counter() - self.run_start, step - self.start, self.run
        self.say(f"\n{self.label} [{self.cfg.preset}] {stopped} at step {step}/{self.cfg.steps}: {done} steps in "
                 f"{seconds / 60:.1f} min ({done / seconds:.2f} steps/s, {done * self.cfg.batch_size / seconds:.0f} "
                 f"samples/s)\n"
                 f"  loss      {self.first_loss:.4f} (first log) -> {self.history[-1]['loss']:.4f} (last)\n"
                 f"  checkpoint {checkpoint}\n"
                 f"  metrics   {run.metrics_path}   (tensorboard --logdir {run.tb_dir})\n"
                 + (f"  previews  {run.previews_dir}/ (newest: step_{last_preview:08d}.png)\n" if last_preview
                    else "")
                 + (f"  diagnostic at step {self.last_diagnostic[0]} (x0 MSE by t bucket; below the mean image is "
                    f"better):\n{diagnostic_table(self.last_diagnostic[1])}\n" if self.last_diagnostic else ""))


class Previews:
    """The EMA model on the first val captions, one fixed seed each, drawn with a short DDIM (rank 0).

    A preview that cannot be decoded (a VAE shard set whose VAE is unreachable) must not end a long run:
    the first failure is reported and previews stop."""

    def __init__(self, run, shard_set, cfg, dist, autocast_dtype, label: str, say, normalization):
        self.run, self.shard_set, self.cfg, self.label, self.say = run, shard_set, cfg, label, say
        self.norm = normalization
        self.autocast_dtype, self.device = autocast_dtype, dist.device
        self.enabled = bool(cfg.preview_every) and dist.master
        self.last = 0
        self._decode = None  # built at the first preview (for a VAE set: loads the VAE)
        if self.enabled:
            from train.data import preview_prompts

            self.captions, text = preview_prompts(shard_set, cfg.preview_prompts)
            self.text = text.to(self.device)
            self.null_text = shard_set.null_text().to(self.device)

    def due(self, step: int) -> bool:
        return self.enabled and (step % self.cfg.preview_every == 0 or step == self.cfg.steps)

    def draw(self, ema, step: int, writer) -> None:
        cfg, ss = self.cfg, self.shard_set
        try:
            if self._decode is None:
                self._decode = (functools.partial(pixels_to_uint8, scale=ss.latent_scale)
                                if ss.latent_format == "pixels" else ss.image_codec(self.device).decode)
            x = ddim_sample(ema, self.norm.text_in(self.text), self.norm.text_in(self.null_text),
                            seeds=list(range(len(self.captions))), steps=cfg.preview_steps, scale=cfg.preview_scale,
                            autocast_dtype=self.autocast_dtype, prediction=cfg.prediction)
            x = self.norm.image_out(x)
            with torch.no_grad():
                images = self._decode(x)
        except Exception as exc:  # noqa: BLE001 -- reported once, then previews stop; the run goes on
            self.say(f"previews disabled ({type(exc).__name__}: {exc}); for a VAE shard set, install diffusers and "
                     "make the manifest's VAE reachable; --preview-every 0 turns previews off")
            self.enabled = False
            return
        fig = grid_figure(images, self.captions, title=f"{self.label} step {step} (EMA, DDIM {cfg.preview_steps}, "
                                                        f"scale {cfg.preview_scale:g})")
        save_figure(fig, self.run.previews_dir / f"step_{step:08d}.png")
        writer.add_figure("preview", fig, step)
        self.last = step
