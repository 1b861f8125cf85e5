"""`python -m pipeline verify DIR`: is this shard set whole and readable? Exit 1 on any fault.

Checks every shard against the manifest (present, sha256, record and caption counts), reads every record
(members present, dtypes and shapes as the manifest says, values finite, json consistent, keys unique across
the set), and the set-level files (null_text.npy, a saved text tower).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.manifest import FORMAT_VERSION, NULL_TEXT, load_manifest, sha256_file

MAX_FAULTS_SHOWN = 20


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def caption_count(record: dict) -> int:
    """Text states a record holds: its captions, or (a set without caption texts) its state files."""
    captions = record.get("captions")
    return len(captions) if captions is not None else len(record.get("caption_files", []))


def check_record(sample: dict, split: str, latent_shape: tuple, text_len: int, text_dim: int,
                 images: bool = True) -> list[str]:
    key = sample["__key__"]
    needed = {"latent.npy", "text.npy", "json"} | ({"png"} if split != "train" and images else set())
    if missing := needed - set(sample):
        return [f"{key}: missing member(s) {sorted(missing)}"]
    faults = []
    latent, text, record = _load_npy(sample["latent.npy"]), _load_npy(sample["text.npy"]), json.loads(sample["json"])
    if latent.dtype != np.float16 or latent.shape != latent_shape:
        faults.append(f"{key}: latent {latent.dtype} {latent.shape}, manifest says float16 {latent_shape}")
    if text.dtype != np.float16 or text.ndim != 3 or text.shape[1:] != (text_len, text_dim):
        faults.append(f"{key}: text {text.dtype} {text.shape}, manifest says float16 [K, {text_len}, {text_dim}]")
    elif text.shape[0] != caption_count(record) or text.shape[0] == 0:
        faults.append(f"{key}: {text.shape[0]} text states for {caption_count(record)} captions")
    if not (np.isfinite(latent).all() and np.isfinite(text).all()):
        faults.append(f"{key}: non-finite values")
    if record.get("key") != key or record.get("split") != split:
        faults.append(f"{key}: json says key {record.get('key')!r}, split {record.get('split')!r}")
    return faults


def verify(path: str | Path) -> bool:
    import webdataset as wds

    path = Path(path)
    try:
        manifest = load_manifest(path)
    except FileNotFoundError as e:
        print(f"FAULT: {e}")
        return False
    faults = []
    if manifest.get("format_version") != FORMAT_VERSION:
        faults.append(f"format version {manifest.get('format_version')}, this reader knows {FORMAT_VERSION}")
    image, text = manifest["image_encoder"], manifest["text_encoder"]
    latent_shape, text_len, text_dim = tuple(image["latent_shape"]), text["text_len"], text["text_dim"]

    try:
        null = np.load(path / NULL_TEXT)
        if null.shape != (text_len, text_dim) or not np.isfinite(null).all():
            faults.append(f"{NULL_TEXT}: shape {null.shape} or values wrong")
    except (OSError, ValueError) as e:
        faults.append(f"{NULL_TEXT}: {e}")
    if text["spec"].startswith("local-dir:") and not Path(text["spec"][len("local-dir:"):]).is_absolute():
        folder = path / text["spec"][len("local-dir:"):]
        if not (folder / "open_clip_config.json").is_file() or not (folder / "open_clip_pytorch_model.bin").is_file():
            faults.append(f"the saved text tower in {folder} is incomplete")
    stats = manifest.get("statistics")
    if stats and (not (path / stats["file"]).is_file() or sha256_file(path / stats["file"]) != stats["sha256"]):
        faults.append(f"{stats['file']}: missing or differs from the manifest (recompute: python -m pipeline stats {path})")

    seen, totals = set(), {}
    for name, info in tqdm(manifest["shards"].items(), desc="verify", unit="shard"):
        shard = path / name
        if not shard.is_file():
            faults.append(f"{name}: missing")
            continue
        if sha256_file(shard) != info["sha256"]:
            faults.append(f"{name}: sha256 differs from the manifest (corrupted or replaced)")
        records = captions = 0
        try:
            for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
                records += 1
                captions += caption_count(json.loads(sample["json"])) if "json" in sample else 0
                if sample["__key__"] in seen:
                    faults.append(f"{name}: key {sample['__key__']} appears twice in the set")
                seen.add(sample["__key__"])
                faults += check_record(sample, info["split"], latent_shape, text_len, text_dim,
                                       images=manifest.get("stores_images", True))
        except Exception as e:  # a damaged tar raises from deep inside tarfile
            faults.append(f"{name}: unreadable ({type(e).__name__}: {e})")
        if (records, captions) != (info["records"], info["captions"]):
            faults.append(f"{name}: {records} records / {captions} captions, manifest says "
                          f"{info['records']} / {info['captions']}")
        split_total = totals.setdefault(info["split"], [0, 0])
        split_total[0], split_total[1] = split_total[0] + records, split_total[1] + captions
    for split, info in manifest["splits"].items():
        if totals.get(split, [0, 0]) != [info["records"], info["captions"]]:
            faults.append(f"split {split}: {totals.get(split)} records/captions, manifest says "
                          f"{[info['records'], info['captions']]}")

    for fault in faults[:MAX_FAULTS_SHOWN]:
        print(f"FAULT: {fault}")
    if len(faults) > MAX_FAULTS_SHOWN:
        print(f"... and {len(faults) - MAX_FAULTS_SHOWN} more")
    verdict = "OK" if not faults else f"{len(faults)} fault(s)"
    print(f"{path}: {len(manifest['shards'])} shards, {len(seen):,} records, {manifest['counts']['skipped']} "
          f"inputs skipped at build time: {verdict}")
    return not faults
