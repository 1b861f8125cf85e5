"""The on-disk folder of generated samples (docs/CONTRACTS.md §6): PNGs plus the prompt of each.

    folder = SampleFolder(run.eval_dir / "samples", params)       # resumable: finished images are kept
    folder.add(images, prompts_of_batch, indices)                 # PNGs + one index line per image
    for images, entries in iter_sample_batches(folder.path, 64):  # scorers read the prompt stored beside
        ...                                                        # each image, never a re-derived one
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from evaluate.images import load_png, save_grid as save_image_grid, save_png
from evaluate.prompts import Prompt
from ifvit.errors import MissingPath
from ifvit.files import atomic_write_json, atomic_write_text

INDEX = "index.jsonl"
PARAMS = "params.json"


def sample_file(index: int) -> str:
    return f"{index:05d}.png"


class SampleFolder:
    """samples/NNNNN.png + index.jsonl ({"file", "prompt", "seed", "key", "caption_index", "scene"?}).

    `params` (checkpoint step, sampler steps, scale, seed, split, ...) are stored in params.json; a folder
    written with other params is emptied first, one with the same params is resumed. While generating,
    each rank appends to its own index.rankR.jsonl right after its PNGs are in place, so an interrupted
    job loses at most the batch in flight; `finish` merges the parts into index.jsonl.
    """

    def __init__(self, path: str | Path, params: dict, rank: int = 0):
        self.path, self.params, self.rank = Path(path), json.loads(json.dumps(params)), rank

    def prepare(self) -> None:
        """Rank 0 only (then barrier): clear a folder of other params, record ours."""
        params_file = self.path / PARAMS
        if params_file.is_file() and json.loads(params_file.read_text()) != self.params:
            for f in self.path.iterdir():  # only what this class writes
                if f.suffix in (".png", ".jsonl", ".json"):
                    f.unlink()
        atomic_write_json(params_file, self.params)

    def _index_files(self) -> list[Path]:
        return sorted(self.path.glob("index*.jsonl"))

    def done(self) -> dict[str, dict]:
        """Entries already written (file name -> entry), from the merged index and any rank's part."""
        entries = {}
        for f in self._index_files():
            for line in f.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill: that image is simply redone
                    continue
                if (self.path / entry["file"]).is_file():
                    entries[entry["file"]] = entry
        return entries

    def add(self, images: torch.Tensor, prompts: list[Prompt], indices: list[int]) -> None:
        lines = []
        for image, prompt, i in zip(images, prompts, indices):
            save_png(image, self.path / sample_file(i))
            lines.append(json.dumps(prompt.entry(sample_file(i))) + "\n")
        with open(self.path / f"index.rank{self.rank}.jsonl", "a") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> list[dict]:
        """Rank 0 only (after every rank has finished writing): one sorted index.jsonl; returns it."""
        entries = [e for _, e in sorted(self.done().items())]
        atomic_write_text(self.path / INDEX, "".join(json.dumps(e) + "\n" for e in entries))
        for part in self.path.glob("index.rank*.jsonl"):
            part.unlink()
        return entries


def read_index(samples_dir: str | Path) -> list[dict]:
    path = Path(samples_dir) / INDEX
    if not path.is_file():
        raise MissingPath(f"no {INDEX} in {samples_dir}: generate samples with `python -m evaluate --run DIR`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def iter_sample_batches(samples_dir: str | Path, batch_size: int, entries: list[dict] | None = None,
                        problems: list[str] | None = None) -> Iterator[tuple[torch.Tensor, list[dict]]]:
    """(uint8 [B, 3, H, W], index entries) batches of a samples folder (or of the given `entries`).
    An unreadable image is left out and reported in `problems` instead of stopping the scoring."""
    samples_dir = Path(samples_dir)
    entries = read_index(samples_dir) if entries is None else entries
    for start in range(0, len(entries), batch_size):
        images, kept = [], []
        for entry in entries[start:start + batch_size]:
            try:
                images.append(load_png(samples_dir / entry["file"]))
                kept.append(entry)
            except (OSError, ValueError) as e:
                if problems is None:
                    raise
                problems.append(f"{entry['file']}: unreadable ({e})")
        if images:
            yield torch.stack(images), kept


def save_grid(samples_dir: str | Path, path: str | Path, n: int = 64, nrow: int = 8) -> Path:
    """The first `n` samples of the folder in a grid PNG; their prompts are the first `n` lines of index.jsonl."""
    return save_image_grid(next(iter_sample_batches(samples_dir, n))[0], path, nrow)
