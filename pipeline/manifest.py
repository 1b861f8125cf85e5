"""Small, dependency-free helpers around a shard set's files: atomic writes, checksums, the config hash.

A shard set is complete exactly when `manifest.json` exists: every file before it is written to a temporary
name and renamed into place (os.replace is atomic on POSIX), and the manifest is renamed in last.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NULL_TEXT = "null_text.npy"
TEXT_ENCODER_DIR = "text_encoder"  # a randomly initialised tower's weights, saved inside the set
STAGING = ".staging"  # per-shard sidecars of an unfinished job; removed once the manifest is written


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


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
        raise FileNotFoundError(
            f"no {MANIFEST} in {shard_dir}: it is not a finished shard set. Build one with "
            f"`make shards` (shapes) or `python -m pipeline coco|table ... --out {shard_dir}`; "
            "if a job was interrupted, run the same command again to finish it")
    return json.loads(path.read_text(encoding="utf-8"))
