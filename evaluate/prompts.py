"""Evaluation prompts: which records of a split are sampled, with which caption and noise seed.

    prompts, problems = choose_prompts(shard_set, "val", n=30_000, seed=0)   # distinct images, one caption each

Selection is by a hash of (seed, record key): a larger `n` extends a smaller one (the first 64 prompts of an
FID-30K run are the 64 of a quick run), every variant gets the same prompts and noise seeds, and one pass
over the split keeps at most `n` captions' encodings in memory.
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class Prompt:
    key: str  # the record's key in the shard set
    prompt: str | None  # the caption used, verbatim (None: a set without caption texts)
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
        captions = record["json"].get("captions")
        if captions is None:  # U-ViT features without annotation files: states only, the text is unknown
            captions = [None] * len(record["json"].get("caption_files", []))
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
