"""Data statistics of a shard set: what the trainer standardises with and the diagnostic's baseline.

    python -m pipeline stats shards/shapes        # an existing set: one cheap pass, nothing re-encoded

Every pipeline job computes them once its manifest is written; a set built before they existed gets them
from `pipeline stats` or at the first training start. They live in `statistics.npz` beside the shards,
summarised in the manifest under "statistics". Adding them never touches the config hash: they are
derived from the shards, not an input of them.

Computed on the model's input, i.e. after `to_model_input` (pixels times 1.0; VAE moments sampled and
times the latent scale, so the coco preset's 0.23010 stays what the latents are scaled by):
    image_mean_map  [C, S, S]  the mean training image (the "predict the data mean" baseline)
    image_mean      [C]        per channel          image_std  [C]
    text_mean       [T, D]     per token and channel (every caption of every record)   text_std  [T, D]
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from ifvit.files import atomic_path, atomic_write_json
from pipeline.manifest import MANIFEST, sha256_file

STATISTICS = "statistics.npz"
FIELDS = ("image_mean_map", "image_mean", "image_std", "text_mean", "text_std")
MAX_RECORDS = 4096  # a fixed prefix of the train split: enough for means and stds to 2-3 digits
STD_FLOOR = 1e-3  # a constant channel or token (the padding after the end token) is not blown up


def compute_statistics(shard_set, max_records: int = MAX_RECORDS, split: str = "train") -> dict[str, np.ndarray]:
    """One pass over the first `max_records` records of `split`, float64 sums (Welford is not needed: the
    values are O(1) and the counts small)."""
    from pipeline.reader import to_model_input

    generator = torch.Generator().manual_seed(0)  # the posterior samples of VAE moments: reproducible
    n_images = n_captions = 0
    img_sum = img_sq = text_sum = text_sq = None
    for i, record in enumerate(shard_set.records(split)):
        if i >= max_records:
            break
        x = to_model_input(torch.from_numpy(record["latent"][None]), shard_set.latent_format,
                           shard_set.latent_scale, generator=generator)[0].double().numpy()
        text = record["text"].astype(np.float64)  # [K, T, D]
        if img_sum is None:
            img_sum, img_sq = np.zeros_like(x), np.zeros_like(x)
            text_sum, text_sq = np.zeros(text.shape[1:]), np.zeros(text.shape[1:])
        img_sum += x
        img_sq += x * x
        text_sum += text.sum(0)
        text_sq += (text * text).sum(0)
        n_images += 1
        n_captions += len(text)
    if not n_images:
        raise ValueError(f"{shard_set.path} has no {split} records to compute statistics from")
    mean_map = img_sum / n_images
    channel_mean = mean_map.mean(axis=(1, 2))
    channel_var = (img_sq / n_images).mean(axis=(1, 2)) - channel_mean**2
    text_mean = text_sum / n_captions
    text_var = text_sq / n_captions - text_mean**2
    stats = {"image_mean_map": mean_map, "image_mean": channel_mean,
             "image_std": np.sqrt(np.maximum(channel_var, 0.0)).clip(min=STD_FLOOR),
             "text_mean": text_mean, "text_std": np.sqrt(np.maximum(text_var, 0.0)).clip(min=STD_FLOOR)}
    stats = {k: v.astype(np.float32) for k, v in stats.items()}
    stats["records"] = np.array(n_images)
    return stats


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz numpy reads, written atomically and byte-reproducibly: np.savez stamps each member with the
    current time, which would make two builds of one shard set differ."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def write_statistics(shard_dir: str | Path, stats: dict[str, np.ndarray]) -> dict:
    """statistics.npz, then the manifest's summary of it (both atomic; the manifest last)."""
    shard_dir = Path(shard_dir)
    save_npz(shard_dir / STATISTICS, stats)
    summary = {"file": STATISTICS, "sha256": sha256_file(shard_dir / STATISTICS), "split": "train",
               "records": int(stats["records"]),
               "image_mean": [round(float(v), 6) for v in stats["image_mean"]],
               "image_std": [round(float(v), 6) for v in stats["image_std"]],
               "text_std_range": [round(float(stats["text_std"].min()), 6), round(float(stats["text_std"].max()), 6)]}
    manifest = json.loads((shard_dir / MANIFEST).read_text(encoding="utf-8"))
    manifest["statistics"] = summary
    atomic_write_json(shard_dir / MANIFEST, manifest)
    return summary


def read_statistics(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a statistics file (never pickles); a damaged file raises ValueError."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in FIELDS if k not in data]
        if missing:
            raise ValueError(f"{path} lacks {missing}: recompute it with `python -m pipeline stats`")
        return {k: data[k] for k in (*FIELDS, "records") if k in data}


def ensure_statistics(shard_set) -> dict[str, np.ndarray]:
    """The set's statistics: from statistics.npz, else computed now and kept in the set (or, where the set is
    read-only, in the cache folder), so the pass runs once per set."""
    from ifvit.files import cache_dir

    own = shard_set.path / STATISTICS
    if own.is_file() and "statistics" in shard_set.manifest:
        return read_statistics(own)
    cached = cache_dir() / "statistics" / f"{shard_set.manifest['config_hash']}.npz"
    if cached.is_file():
        return read_statistics(cached)
    print(f"{shard_set.path}: no data statistics yet; computing them once from the train split "
          f"(`python -m pipeline stats {shard_set.path}` does this ahead of time)", flush=True)
    stats = compute_statistics(shard_set)
    try:
        shard_set.manifest["statistics"] = write_statistics(shard_set.path, stats)
    except OSError:  # a read-only set (shared storage): keep them in this user's cache instead
        save_npz(cached, stats)
    return stats
