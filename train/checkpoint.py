"""Checkpoint files of a run directory (docs/CONTRACTS.md §4), torch only; the run as a whole is
train/run_dir.py's RunDir.

    runs/NAME/checkpoints/step_00001000.pt   {"model", "ema", "optimizer", "step", "config", "rng", "data"}
    runs/NAME/checkpoints/latest.pt          the newest of them

Checkpoints are plain dicts of tensors, numbers and strings, so `torch.load(weights_only=True)` reads them,
and every file appears atomically (ifvit.files): a run killed mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ifvit.files import atomic_path, temporary_name
from train.model import ModelConfig, UViT

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def save_checkpoint(run_dir: str | Path, state: dict, keep: int = 0) -> Path:
    """Write `state` as step_<step>.pt and make latest.pt point at it; keep the newest `keep` (0 = all)."""
    path = checkpoint_path(run_dir, state["step"])
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    latest = path.with_name(LATEST)
    tmp = temporary_name(latest)
    try:
        os.link(path, tmp)  # a hard link costs no space or time; a copy where links are not supported
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(step, path)] of the run's step checkpoints, oldest first."""
    found = (Path(run_dir) / CHECKPOINT_DIR).glob("step_*.pt")
    return sorted((int(p.stem.removeprefix("step_")), p) for p in found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    path = Path(run_dir) / CHECKPOINT_DIR / LATEST
    return path if path.exists() else None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict:
    # mmap: only the tensors actually used are read (evaluate wants the EMA weights, not the optimizer).
    return torch.load(path, map_location=device, weights_only=True, mmap=True)


def model_from_checkpoint(ckpt: dict, ema: bool = True, device: str | torch.device = "cpu") -> UViT:
    """The UViT a loaded checkpoint describes (its own model config), EMA weights by default, in eval mode."""
    model = UViT(ModelConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return model.to(device).eval()


def load_run(run_dir: str | Path, step: int | None = None, ema: bool = True,
             device: str | torch.device = "cpu") -> tuple[UViT, dict]:
    """(the model of a run in eval mode -- EMA weights by default --, the run's config dict {"variant",
    "model", "train", "shards", ...}). `step` picks a checkpoint; None takes the newest. A shorthand over
    train.run_dir.RunDir, the run-directory API every stage uses; a folder of checkpoints without
    config.json is read too (its config then comes from the checkpoint)."""
    from train.run_dir import RunDir

    run = RunDir.open(run_dir) if RunDir.exists(run_dir) else RunDir(run_dir, {})
    ckpt = run.load_checkpoint(step)
    return model_from_checkpoint(ckpt, ema, device), run.config or ckpt["config"]
