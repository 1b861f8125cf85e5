"""Comparing two builds of one shard set (the executors must agree byte for byte)."""
from __future__ import annotations

import json
from pathlib import Path

# What may differ between two builds of the same set: when it was built and how long it took.
BUILD_ONLY = ("created", "timing")


def assert_same_shard_set(a: Path, b: Path) -> None:
    """Every file of `a` and `b` has the same bytes, except manifest.json, which may differ in BUILD_ONLY."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert any(p.suffix == ".tar" for p in files_a)
    for rel in files_a:
        if rel.name != "manifest.json":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs"
    manifest_a, manifest_b = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    for key in BUILD_ONLY:
        manifest_a.pop(key), manifest_b.pop(key)
    assert manifest_a == manifest_b
