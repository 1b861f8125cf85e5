"""A run directory: the one way every stage creates, opens and reads `runs/NAME/` (docs/CONTRACTS.md §4).

    run = RunDir.create("runs/x", config, shards="shards/shapes")   # train, train.convert: a new run
    run = RunDir.open("runs/x", shards=args.shards)                  # everyone else; --shards overrides
    run.config, run.variant, run.model_config                        # config.json
    run.sampling()                                                   # {"prediction", "normalization"} for sample()
    run.shard_set()                                                  # pipeline.reader.ShardSet
    run.checkpoints(); run.load_model(step=None, ema=True)           # [(step, path)]; a UViT in eval mode
    run.save_checkpoint(state, keep=0); run.append_metrics(rows)     # train's writes
    run.eval_dir, run.read_eval_metrics(), run.write_eval_metrics(m) # evaluate's

Paths are resolved once, when the run is created: config.json stores the shard set as an **absolute** path
(a run is read from other working directories: torchrun nodes, evaluate, compare). When the set has moved,
every reader takes `--shards` (`RunDir.open(path, shards=...)`), which wins over the recorded path. Runs
written before this rule may hold a path relative to the directory they were trained from; it is read as
such. A run created from foreign weights may record no shard set at all (`"shards": null`); reading its
data then asks for --shards.

config.json is the run's record -- {"variant", "model": ModelConfig fields, "train": TrainConfig fields,
"shards", ...}; other keys (e.g. what a conversion came from, how data was normalised) are kept as they are.
"variant" is always derived from the model config (train.model.variant_name), never taken on trust. Each
checkpoint carries a copy of the config of its time, so a checkpoint file alone can rebuild its model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ifvit.errors import MissingPath, UserError
from ifvit.files import atomic_write_json, atomic_write_text
from ifvit.lock import FolderLock
from train.checkpoint import (CHECKPOINT_DIR, LATEST, list_checkpoints, load_checkpoint, model_from_checkpoint,
                              save_checkpoint)
from train.model import ModelConfig, UViT, variant_name

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVAL = "eval"
EVAL_METRICS = "metrics.json"


def _record_path(shards: str | os.PathLike | None) -> str | None:
    return None if shards is None else str(Path(shards).expanduser().resolve())


class RunDir:
    """runs/NAME/: config.json, metrics.jsonl, checkpoints/, previews/, tb/, eval/."""

    def __init__(self, path: str | os.PathLike, config: dict, shards: str | os.PathLike | None = None):
        self.path = Path(path)
        self.config = config
        self._shards_override = shards

    # ---------------------------------------------------------------------------------------- create / open

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, *, shards: str | os.PathLike | None = None) -> "RunDir":
        """Write config.json of a run (new, or resumed with changed options) and return the run. `config`
        needs "model" (ModelConfig fields); "variant" is derived from it; `shards` is recorded absolute."""
        config = {"variant": variant_name(ModelConfig(**config["model"])),
                  **{k: v for k, v in config.items() if k != "variant"}}
        config["shards"] = _record_path(shards) if shards is not None else config.get("shards")
        run = cls(path, config)
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run.path / CONFIG, config, indent=2)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike, shards: str | os.PathLike | None = None) -> "RunDir":
        """An existing run. `shards` (a --shards option) replaces the recorded shard set when given."""
        path = Path(path)
        config_file = path / CONFIG
        if not config_file.is_file():
            hint = (f"it has checkpoints but no {CONFIG}: it was not written by `python -m train`"
                    if (path / CHECKPOINT_DIR).is_dir() else "train one first (make train) or pass the right "
                                                              "run directory")
            raise MissingPath(f"no run at {path} (no {CONFIG}): {hint}")
        return cls(path, json.loads(config_file.read_text()), shards)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / CONFIG).is_file()

    def lock(self, purpose: str = "") -> FolderLock:
        return FolderLock(self.path, purpose)

    # ---------------------------------------------------------------------------------------- config

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def variant(self) -> str:
        return variant_name(self.model_config)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.config["model"])

    @property
    def train_config(self) -> dict:
        return self.config.get("train", {})

    def normalization(self):
        """The train.normalization.Normalization the run was trained with (identity for the paper's recipe)."""
        from train.normalization import Normalization

        cfg = self.train_config
        return Normalization.load(self.path, cfg.get("image_norm", "scale"), cfg.get("text_norm", "none"))

    def sampling(self) -> dict:
        """What every sampler call needs to know about the run's weights, as keyword arguments of
        evaluate.sampler.sample: {"prediction", "normalization"}. Runs written before these options
        existed (and converted U-ViT runs) are epsilon with the identity."""
        return {"prediction": self.train_config.get("prediction", "epsilon"),
                "normalization": self.normalization()}

    @property
    def shards(self) -> Path | None:
        """The shard set: the --shards override, else the recorded path (None when nothing is recorded)."""
        chosen = self._shards_override or self.config.get("shards")
        return None if chosen is None else Path(chosen).expanduser()

    def shard_set(self):
        """The run's pipeline.reader.ShardSet (a clear error when it is missing or was never recorded)."""
        from pipeline.reader import ShardSet

        if self.shards is None:
            raise UserError(f"{self.path} records no shard set (it was created from foreign weights): pass "
                            "--shards DIR with the shard set to sample and evaluate with")
        if not self.shards.is_dir():
            raise MissingPath(f"the shard set {self.shards} of {self.path} is not there: pass --shards DIR where "
                              "it lives now")
        return ShardSet(self.shards)

    # ---------------------------------------------------------------------------------------- checkpoints

    def checkpoints(self) -> list[tuple[int, Path]]:
        """[(step, path)] oldest first."""
        return list_checkpoints(self.path)

    def checkpoint_path(self, step: int | None = None) -> Path:
        """The checkpoint of `step` (None: the newest), or an error listing what there is."""
        if step is None:
            latest = self.path / CHECKPOINT_DIR / LATEST
            if not latest.exists():
                raise MissingPath(f"no checkpoint in {self.path}/{CHECKPOINT_DIR}: train first "
                                  f"(python -m train --out {self.path} ...) or pass the right run directory")
            return latest
        steps = dict(self.checkpoints())
        if step not in steps:
            raise MissingPath(f"no checkpoint for step {step} in {self.path}: available steps are "
                              f"{sorted(steps) or 'none'}")
        return steps[step]

    def load_checkpoint(self, step: int | None = None, device: str | torch.device = "cpu") -> dict:
        return load_checkpoint(self.checkpoint_path(step), device)

    def load_model(self, step: int | None = None, ema: bool = True, device: str | torch.device = "cpu") -> UViT:
        """The model of a checkpoint (EMA weights by default) in eval mode, built from that checkpoint's
        own model config."""
        return model_from_checkpoint(self.load_checkpoint(step), ema, device)

    def save_checkpoint(self, state: dict, keep: int = 0) -> Path:
        """`state` holds at least "model", "ema" (state dicts) and "step"; the run's config is added."""
        return save_checkpoint(self.path, {**state, "config": self.config}, keep=keep)

    # ---------------------------------------------------------------------------------------- metrics

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def read_metrics(self, problems: list[str] | None = None) -> list[dict]:
        """metrics.jsonl rows; a cut or garbled line is skipped (and reported in `problems` if given)."""
        rows = []
        if not self.metrics_path.is_file():
            return rows
        for i, line in enumerate(self.metrics_path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if problems is not None:
                    problems.append(f"{self.metrics_path}:{i}: not JSON, skipped")
        return rows

    def append_metrics(self, rows: list[dict]) -> None:
        with self.metrics_path.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    def truncate_metrics(self, upto_step: int) -> None:
        """Drop the rows a killed run logged after its last checkpoint (they are about to be redone)."""
        if self.metrics_path.exists():
            keep = [row for row in self.read_metrics() if row["step"] <= upto_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in keep))

    # ---------------------------------------------------------------------------------------- outputs

    @property
    def previews_dir(self) -> Path:
        return self.path / "previews"

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL

    @property
    def samples_dir(self) -> Path:
        """The main evaluation's samples (PNGs + index.jsonl)."""
        return self.eval_dir / "samples"

    def read_eval_metrics(self) -> dict:
        """eval/metrics.json (MissingPath naming the command when the run is not evaluated yet)."""
        path = self.eval_dir / EVAL_METRICS
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingPath(f"no {path}: evaluate the run first (python -m evaluate --run {self.path})") from None

    def write_eval_metrics(self, metrics: dict) -> Path:
        return atomic_write_json(self.eval_dir / EVAL_METRICS, metrics)
