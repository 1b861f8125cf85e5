"""Small, dependency-free helpers around a shard set's files: names, checksums, the config hash.

A shard set is complete exactly when `manifest.json` exists: every file before it appears whole
(ifvit.files: written under a temporary name, then renamed), and the manifest is renamed in last.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ifvit.errors import MissingPath

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.npy"
TEXT_ENCODER_DIR = "text_encoder"  # a randomly initialised tower's weights, saved inside the set
STAGING = ".staging"  # per-shard sidecars of an unfinished job; removed once the manifest is written


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_hash(config: dict) -> str:
    """Hash of everything that changes a shard set's bytes (not batch size, cluster address or --strict)."""
    text = json.dumps({"format_version": FORMAT_VERSION, **config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise MissingPath(
            f"no {MANIFEST} in {shard_dir}: it is not a finished shard set. Build one with "
            f"`make shards` (shapes) or `python -m pipeline coco|table ... --out {shard_dir}`; "
            "if a job was interrupted, run the same command again to finish it")
    return json.loads(path.read_text(encoding="utf-8"))
