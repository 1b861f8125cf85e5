"""Comparing two builds of one shard set (the executors must agree byte for byte)."""
from __future__ import annotations

import json
from pathlib import Path

# What may differ between two builds of the same set: when it was built and how long it took.
BUILD_ONLY = ("created", "timing")


def built_files(root: Path) -> list[Path]:
    """The set's files (evaluation writes nothing into a shard set: its FID cache is elsewhere)."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def assert_same_shard_set(a: Path, b: Path) -> None:
    """Every file of `a` and `b` has the same bytes, except manifest.json, which may differ in BUILD_ONLY."""
    files = built_files(a)
    assert files == built_files(b)
    assert any(p.suffix == ".tar" for p in files)
    for rel in files:
        if rel.name != "manifest.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    manifest_a, manifest_b = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    for key in BUILD_ONLY:
        manifest_a.pop(key), manifest_b.pop(key)
    assert manifest_a == manifest_b
