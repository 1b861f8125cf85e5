"""The process group of a torchrun job, and the few collectives train and evaluate share. Torch only.

    dist = init_distributed("auto")            # one process without torchrun; nccl on GPUs, gloo on CPUs
    with dist.exclusive(out, "train"):         # rank 0 locks the output folder for every rank
        ...
    rows = dist.gather(my_rows)                # every rank's object, on every rank

Every helper is a no-op in a single process, so callers never branch on the world size.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist

from ifvit.errors import Unavailable
from ifvit.lock import FolderBusy, FolderLock


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()

    @contextmanager
    def exclusive(self, folder: str | Path, purpose: str = ""):
        """Hold `folder`'s lock (ifvit.lock) on rank 0 for the whole job. A busy folder raises FolderBusy on
        every rank, so all of them stop before touching it."""
        lock, busy = None, None
        if self.master:
            try:
                lock = FolderLock(folder, purpose).acquire()
            except FolderBusy as exc:
                busy = str(exc)
        busy = self.broadcast(busy)
        if busy:
            raise FolderBusy(busy)
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()


def init_distributed(device: str = "auto") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on GPUs, gloo on CPUs; a plain run is one process."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not cuda:
        raise Unavailable("device=cuda but torch sees no GPU: pass --device cpu (or auto) or fix the CUDA install")
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    rank = torch_dist.get_rank() if world > 1 else 0
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
