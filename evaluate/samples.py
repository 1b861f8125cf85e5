"""Evaluation prompts and the on-disk folder of generated samples (CONTRACTS §6).

    prompts = choose_prompts(shard_set, "val", n=30_000, seed=0)   # distinct images, one caption each
    folder = SampleFolder(run / "eval" / "samples", params)        # resumable: finished images are kept
    folder.add(images, prompts_of_batch, indices)                 # PNGs + one index line per image
    for images, entries in iter_sample_batches(folder.path, 64):  # scorers read the prompt stored beside
        ...                                                        # each image, never a re-derived one

Selection is by a hash of (seed, record key): a larger `n` extends a smaller one (the first 64 prompts of an
FID-30K run are the 64 of a quick run), every variant gets the same prompts and noise seeds, and one pass
over the split keeps at most `n` captions' encodings in memory.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

INDEX = "index.jsonl"
PARAMS = "params.json"


@dataclass
class Prompt:
    key: str  # the record's key in the shard set
    prompt: str  # the caption used, verbatim
    caption_index: int
    seed: int  # seed of the image's initial noise (evaluate.sampler)
    text: np.ndarray  # [T, D] the shard set's own encoding of `prompt`
    scene: dict | None = None  # shapes ground truth, for the judge

    def entry(self, file: str) -> dict:
        return {"file": file, "prompt": self.prompt, "seed": self.seed, "key": self.key,
                "caption_index": self.caption_index, **({"scene": self.scene} if self.scene else {})}


def choose_prompts(shard_set, split: str, n: int, seed: int = 0) -> tuple[list[Prompt], list[str]]:
    """`n` distinct records of `split` (all of them if it has fewer), one seeded caption each, in a
    seeded random order. Returns the prompts and a list of problems (records left out, with the reason)."""
    chosen: list[tuple[int, str, Prompt]] = []  # max-heap on rank via negation: the n smallest ranks stay
    problems = []
    for record in shard_set.records(split):
        captions = record["json"].get("captions") or []
        if not captions or len(captions) != len(record["text"]):
            problems.append(f"{record['key']}: {len(captions)} captions but {len(record['text'])} encodings")
            continue
        digest = hashlib.sha256(f"{seed}/{record['key']}".encode()).digest()
        rank = int.from_bytes(digest[:8], "big")
        if len(chosen) == n and rank >= -chosen[0][0]:
            continue
        k = int.from_bytes(digest[8:12], "big") % len(captions)
        prompt = Prompt(key=record["key"], prompt=captions[k], caption_index=k,
                        seed=int.from_bytes(digest[12:16], "big") & 0x7FFFFFFF,
                        text=np.array(record["text"][k]), scene=record["json"].get("scene"))
        item = (-rank, record["key"], prompt)
        if len(chosen) < n:
            heapq.heappush(chosen, item)
        else:
            heapq.heapreplace(chosen, item)
    return [p for _, _, p in sorted(chosen, key=lambda item: (-item[0], item[1]))], problems


def sample_file(index: int) -> str:
    return f"{index:05d}.png"


def save_png(image: torch.Tensor, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


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
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = params_file.with_name(f".{PARAMS}.tmp")
        tmp.write_text(json.dumps(self.params, indent=1))
        os.replace(tmp, params_file)

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
        tmp = self.path / f".{INDEX}.tmp"
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
        os.replace(tmp, self.path / INDEX)
        for part in self.path.glob("index.rank*.jsonl"):
            part.unlink()
        return entries


def read_index(samples_dir: str | Path) -> list[dict]:
    path = Path(samples_dir) / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"no {INDEX} in {samples_dir}: generate samples with `python -m evaluate --run DIR`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


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
                images.append(load_image(samples_dir / entry["file"]))
                kept.append(entry)
            except (OSError, ValueError) as e:
                if problems is None:
                    raise
                problems.append(f"{entry['file']}: unreadable ({e})")
        if images:
            yield torch.stack(images), kept


def save_grid(samples_dir: str | Path, path: str | Path, n: int = 64, nrow: int = 8, min_cell: int = 128) -> Path:
    """The first `n` samples in a grid PNG (small images are enlarged with nearest-neighbour, so the
    32 px shapes samples stay crisp); their prompts are the first `n` lines of index.jsonl."""
    from torchvision.utils import make_grid

    images = next(iter_sample_batches(samples_dir, n))[0]
    factor = max(1, -(-min_cell // images.shape[-1]))
    images = images.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2)
    grid = make_grid(images, nrow=min(nrow, len(images)), padding=2, pad_value=255)
    path = Path(path)
    save_png(grid, path)
    return path
