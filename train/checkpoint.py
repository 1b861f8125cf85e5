"""Checkpoints of a run directory (docs/CONTRACTS.md §4), torch only.

    runs/NAME/checkpoints/step_00001000.pt   {"model", "ema", "optimizer", "step", "config", "rng", "data"}
    runs/NAME/checkpoints/latest.pt          the newest of them

Checkpoints are plain dicts of tensors, numbers and strings, so `torch.load(weights_only=True)` reads them,
and every file appears atomically (written to a temporary name, then `os.replace`d): a run killed mid-write
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from train.model import ModelConfig, UViT

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.pt"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(run_dir: str | Path, state: dict, keep: int = 0) -> Path:
    """Write `state` as step_<step>.pt and make latest.pt point at it; keep the newest `keep` (0 = all)."""
    path = checkpoint_path(run_dir, state["step"])
    atomic_save(state, path)
    latest = path.with_name(LATEST)
    tmp = path.with_name(f".{LATEST}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
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


def load_run(run_dir: str | Path, step: int | None = None, ema: bool = True,
             device: str | torch.device = "cpu") -> tuple[UViT, dict]:
    """The model of a run (EMA weights by default) in eval mode, and the run's config dict
    {"variant", "model", "train", "shards"}. `step` picks a checkpoint; None takes the newest."""
    if step is None:
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/{CHECKPOINT_DIR}: train first "
                                    f"(python -m train --out {run_dir} ...) or pass the right run directory")
    else:
        steps = dict(list_checkpoints(run_dir))
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {run_dir}: available steps are "
                                    f"{sorted(steps) or 'none'}")
        path = steps[step]
    ckpt = load_checkpoint(path)
    config = ckpt["config"]
    model = UViT(ModelConfig(**config["model"]))
    model.load_state_dict(ckpt["ema" if ema else "model"])
    return model.to(device).eval(), config
