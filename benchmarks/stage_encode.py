"""Stage 4: what encoding MS-COCO 2014 costs, measured through the pipeline's own code.

    vae_encoder   pipeline.bench: the SD-VAE encoder at 256 px (real architecture, random weights), fp32/TF32
    text_tower    pipeline.bench: the CLIP ViT-L/14 text tower (real architecture, random weights), and the
                  tokenizer, which the encoder runs on one CPU core
    preprocess    pipeline.sources.prepare on COCO-sized JPEGs (640x480: decode, crop, LANCZOS resize) in a
                  pool of every core, as the load stage runs
    write         pipeline.stages.write_shard of a COCO-shaped shard (8x32x32 moments, 5 captions of 77x768)
Then the projected time for train2014 + val2014 with the stages overlapping (the slowest one bounds it).
"""
from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.campaign import Recorder, StageContext, stage_device
from benchmarks.stage_eval import TOY_CLIP, TOY_VAE
from pipeline.bench import bench_text, bench_vae
from pipeline.executors import pool_context
from pipeline.sources import Preprocess, prepare

COCO_2014 = {"images": 82_783 + 40_504, "captions": 414_113 + 202_654}  # train2014 + val2014
COCO_RECORD_BYTES = 8 * 32 * 32 * 2 + 5 * 77 * 768 * 2  # float16 moments + five float16 text states


class JpegFolder:
    """A source over the JPEG files of a folder (the shape of CocoSource.load, without annotations)."""
    name = "jpegs"

    def __init__(self, root: Path):
        self.root = str(root)

    def load(self, row: dict):
        return Image.open(Path(self.root) / row["source_file"]), ["a photo"], {}


def write_jpegs(root: Path, n: int, size=(640, 480)) -> list[dict]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        # A smooth image with noise: JPEG sizes like a photo's (~100 KB at 640x480), unlike pure noise.
        base = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
        pixels = (0.8 * base + 0.2 * rng.integers(0, 255, (size[1], size[0], 3))).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:06d}.jpg", quality=90)
        rows.append({"key": f"{i:06d}", "split": "train", "id": i, "source_file": f"{i:06d}.jpg"})
    return rows


def _prepare_many(args) -> int:
    source, rows, pre = args
    return sum(prepare(source, row, pre)[0] is not None for row in rows)


def preprocess_rate(work: Path, per_worker: int, workers: int) -> dict:
    files = write_jpegs(work / "jpegs", 16)
    source, pre = JpegFolder(work / "jpegs"), Preprocess()
    chunks = [(source, [files[(w * per_worker + i) % len(files)] for i in range(per_worker)], pre)
              for w in range(workers)]
    with pool_context().Pool(workers) as pool:
        pool.map(_prepare_many, [(source, files[:1], pre)] * workers)  # warm-up: workers up, libraries loaded
        start = time.perf_counter()
        done = sum(pool.map(_prepare_many, chunks))
        seconds = time.perf_counter() - start
    return {"images_per_s": done / seconds, "workers": workers, "source_size": [640, 480], "resolution": 256}


def write_rate(work: Path, records: int) -> dict:
    from pipeline.manifest import STAGING
    from pipeline.stages import write_shard

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((8, 32, 32)).astype(np.float16)
    text = rng.standard_normal((5, 77, 768)).astype(np.float16)
    work_item = {"name": "train-000000.tar", "split": "train", "skipped": [], "truncated": [], "stats": [0, 0, 0],
                 "identities": {}, "null_text": text[0],
                 "records": [{"key": f"{i:012d}", "captions": ["a photo"] * 5} for i in range(records)],
                 "latents": [latent] * records, "texts": [text] * records, "pngs": [None] * records}
    out = work / "shards"
    (out / STAGING).mkdir(parents=True, exist_ok=True)
    payload = {"shard": work_item["name"], "work": pickle.dumps(work_item)}
    start = time.perf_counter()
    write_shard(payload, str(out))
    seconds = time.perf_counter() - start
    size = (out / work_item["name"]).stat().st_size
    return {"records_per_s": records / seconds, "mb_per_s": size / seconds / 1e6, "records": records,
            "record_bytes": size / records}


def run(rec: Recorder, ctx: StageContext) -> None:
    import open_clip

    device = stage_device(ctx)
    cuda = device.type == "cuda"
    rec.set("settings", {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": "float32 (TF32)",
                         "model": "SD-VAE encoder 256 px, CLIP ViT-L/14 text tower" if not ctx.smoke else "toy"})
    with rec.item("vae_encoder") as out:
        out.update(bench_vae(device, batch=32 if cuda else 2, iters=10 if cuda else 1,
                             **({} if cuda or not ctx.smoke else {"config": TOY_VAE, "resolution": 64})))
    with rec.item("text_tower") as out:
        toy = open_clip.CLIP(**TOY_CLIP) if ctx.smoke else None
        out.update(bench_text(device, batch=512 if cuda else 8, iters=10 if cuda else 1, model=toy))
    with rec.item("preprocess") as out:
        workers = os.cpu_count() or 1
        out.update(preprocess_rate(ctx.work, per_worker=16 if not ctx.smoke else 2, workers=workers))
    with rec.item("write") as out:
        out.update(write_rate(ctx.work, records=500 if not ctx.smoke else 8))
    rec.set("coco2014", project(rec.data["items"]))


def project(items: dict) -> dict | None:
    """Seconds to encode MS-COCO 2014 with one GPU: the encoder (VAE, then tokenizer + text tower, one after
    the other in one process) against the CPU load stage and the shard writes, which run alongside it."""
    def get(name, key):
        entry = items.get(name, {})
        return entry.get(key) if entry.get("status") == "ok" else None

    vae, text = get("vae_encoder", "images_per_s"), get("text_tower", "captions_per_s")
    tokenize, load = get("text_tower", "tokenize_captions_per_s"), get("preprocess", "images_per_s")
    write = get("write", "mb_per_s")
    if None in (vae, text, tokenize, load, write):
        return None
    images, captions = COCO_2014["images"], COCO_2014["captions"]
    encoder = images / vae + captions / text + captions / tokenize
    shard_gb = images * COCO_RECORD_BYTES / 1e9
    parts = {"encoder_gpu": images / vae + captions / text, "tokenizer": captions / tokenize,
             "load_cpu": images / load, "write": shard_gb * 1e3 / write}
    return {**COCO_2014, "total_s": max(encoder, parts["load_cpu"], parts["write"]), "parts_s": parts,
            "bound_by": max(("encoder", encoder), ("load", parts["load_cpu"]), ("write", parts["write"]),
                            key=lambda kv: kv[1])[0],
            "shard_set_gb": shard_gb, "goal_s": 300,
            "note": "tokenizing runs on one core inside the encoder: with it, the encoder is serial GPU + CPU work"}
