"""What the trainer reads from a shard set: the training stream (exact on resume) and the preview prompts.

The shard set (pipeline.reader.ShardSet, whose loader needs webdataset) is handed in by the trainer; this
module itself imports torch only.
"""
from __future__ import annotations

import functools
import signal

import torch


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
        # U-ViT features without annotation files have states but no texts: label the preview by record key
        captions.append((record["json"].get("captions") or [f"{record['key']} caption 0"])[0])
        texts.append(torch.as_tensor(record["text"][0]).float())
        if len(captions) == n:
            break
    return captions, torch.stack(texts)
