"""Files that appear whole, and the cache folder.

Every file this project writes for another job to read -- a shard, a manifest, a checkpoint, a PNG, a
metrics file -- is written under a temporary name in the same folder and renamed into place (`os.replace`
is atomic on POSIX), so a job killed mid-write leaves the previous version or nothing, never half a file.
Temporary names follow one pattern, `.<name>.tmp-<hex><suffix>`: hidden, unique per writer, and ending
in the real suffix so libraries that pick a format by extension (numpy's savez, PIL) still do.

    atomic_write_json(path, {"step": 3})
    with atomic_path(path) as tmp:        # for a library that wants a path: torch.save, savefig, TarWriter
        torch.save(state, tmp)

Standard library only (see ifvit/__init__.py).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"  # `.<name>.tmp-<hex><suffix>`; `is_temporary` recognises leftovers of a killed writer
CACHE_ENV = "IFVIT_CACHE"
DEFAULT_CACHE = Path("~/.cache/ifvit")


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}{path.suffix}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


@contextmanager
def atomic_path(path: str | os.PathLike, make_parents: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write a file (or a folder) to; renamed onto `path` when the block
    ends without an exception, removed when it raises."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where derived data that can always be recomputed goes (e.g. FID reference statistics): `override`
    (a --cache-dir option), else $IFVIT_CACHE, else ~/.cache/ifvit. Never inside a shard set: that is the
    pipeline's finished product, possibly read-only or shared."""
    chosen = override or os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()
