"""The job's three stages: load a shard's images (CPU), encode them (the encoder), write its tar (CPU).

Both executors (pipeline/executors.py) run exactly these: Ray as CPU tasks and an actor, the local one in a
process pool and the driver's process. Kept apart from the driver (pipeline/job.py) and free of torch at
import time: Ray imports this module in every worker, and only the encoder needs torch, open_clip and
diffusers. A shard travels between the
stages as one pickled dict because it is ragged (K captions per image, per-record json) and Arrow, Ray
Data's block format, has no type for that.
"""
from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from ifvit.files import atomic_path, atomic_write_json
from pipeline.manifest import NULL_TEXT, STAGING, sha256_file
from pipeline.sources import Preprocess, encode_png, prepare, skip


def load_shard(item: dict, source, preprocess: Preprocess) -> dict:
    """CPU task: every row of one shard -> uint8 images [n, 3, R, R], record json, pngs, skipped entries."""
    work = pickle.loads(item["work"])
    images, records, pngs, skipped = [], [], [], []
    for row in work.pop("rows"):
        pixels, record, why = prepare(source, row, preprocess)
        skipped += why
        if pixels is not None:
            images.append(pixels)
            records.append(record)
            pngs.append(encode_png(pixels) if row["split"] != "train" else None)  # FID references come from val
    r = preprocess.resolution
    work.update(images=np.stack(images) if images else np.zeros((0, 3, r, r), np.uint8),
                records=records, pngs=pngs, skipped=skipped)
    return {"shard": item["shard"], "work": pickle.dumps(work)}


class EncodeShard:
    """Actor: holds the image codec and text encoder on its device; encodes one shard per call."""

    def __init__(self, image_spec: str, text_spec: str, batch_size: int, seed: int):
        import torch

        from pipeline.encoders import load_image_codec, load_text_encoder

        if torch.cuda.is_available():
            device = "cuda"
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        else:
            device = "cpu"
            # Half the cores: the other half load and write. (More threads than free cores make torch's
            # OpenMP workers spin against each other: 5x slower on a busy 2-core machine.)
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self.codec = load_image_codec(image_spec, device)
        self.text = load_text_encoder(text_spec, device)
        self.batch_size, self.seed = batch_size, seed
        self.identities = {"image": self.codec.identity(), "text": self.text.identity()}
        self.null_text = self.text([""])[0].half().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        return {"shard": batch["shard"], "work": [pickle.dumps(self.encode(pickle.loads(b))) for b in batch["work"]]}

    def encode(self, work: dict) -> dict:
        import torch

        from pipeline.reader import to_model_input

        records, pngs = work.pop("records"), work.pop("pngs")
        images = torch.from_numpy(work.pop("images"))
        latents = (torch.cat([self.codec.encode(chunk).cpu() for chunk in images.split(self.batch_size)])
                   if len(images) else torch.zeros(0))

        states, truncated = self.encode_captions([c for r in records for c in r["captions"]])
        out = {**work, "records": [], "latents": [], "texts": [], "pngs": [], "truncated": [],
               "identities": self.identities, "null_text": self.null_text}
        for record, latent, png in zip(records, latents, pngs):
            latent16, text16 = latent.half(), torch.stack([states[c] for c in record["captions"]])
            if not (torch.isfinite(latent16).all() and torch.isfinite(text16).all()):
                out["skipped"].append(skip(record, "non-finite latent or text states (float16 overflow?)"))
                continue
            out["records"].append(record)
            out["latents"].append(latent16.numpy())
            out["texts"].append(text16.numpy())
            out["pngs"].append(png)
            out["truncated"] += [{"key": record["key"], "caption": i, "text": c}
                                 for i, c in enumerate(record["captions"]) if c in truncated]

        # Running sums of the model-space latent (a posterior sample for moments) for the measured std.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(work["name"].encode()))
        if out["latents"]:
            z = to_model_input(torch.from_numpy(np.stack(out["latents"])), self.codec.latent_format, 1.0, generator)
            out["stats"] = [float(z.double().sum()), float(z.double().square().sum()), z.numel()]
        else:
            out["stats"] = [0.0, 0.0, 0]
        return out


    def encode_captions(self, captions: list[str]) -> tuple[dict, set]:
        """({caption: float16 [77, D]}, the truncated ones) for one shard's captions, each distinct one encoded
        once, in batches that depend on this shard alone.

        No cache across shards: a caption's float16 states depend (by one ulp, now and then) on the batch it
        was encoded in, since CPU and GPU matmul kernels are chosen by shape. Reusing states from earlier
        shards made a shard's bytes depend on which shards the encoder had seen before, i.e. on the order Ray
        delivers shards and where a killed job resumed, so the executors and a resumed job disagreed."""
        new = list(dict.fromkeys(captions))
        tokens, too_long = self.text.tokenize(new)
        states = {}
        for start in range(0, len(new), self.batch_size):
            encoded = self.text.encode_tokens(tokens[start:start + self.batch_size]).half().cpu()
            states.update(zip(new[start:start + self.batch_size], encoded))
        return states, {c for c, t in zip(new, too_long.tolist()) if t}


def write_shard(item: dict, out: str) -> dict:
    """CPU task: write the shard's tar under a temporary name, rename it into place, then its sidecar."""
    import webdataset as wds

    work, out = pickle.loads(item["work"]), Path(out)
    name = work["name"]
    with atomic_path(out / name, make_parents=False) as tmp:
        with wds.TarWriter(str(tmp), mtime=0) as sink:  # fixed mtime: same inputs -> byte-identical tars
            for record, latent, text, png in zip(work["records"], work["latents"], work["texts"], work["pngs"]):
                sample = {"__key__": record["key"], "latent.npy": latent, "text.npy": text, "json": record}
                if png is not None:
                    sample["png"] = png
                sink.write(sample)
        sidecar = {"name": name, "split": work["split"], "records": len(work["records"]),
                   "captions": sum(len(t) for t in work["texts"]),  # = len(captions), also where texts are unknown
                   "sha256": sha256_file(tmp), "bytes": tmp.stat().st_size,
                   "latent_shape": list(work["latents"][0].shape) if work["latents"] else None,
                   "skipped": work["skipped"], "truncated": work["truncated"], "stats": work["stats"],
                   "identities": work["identities"]}
    if not (out / NULL_TEXT).exists():
        with atomic_path(out / NULL_TEXT) as tmp:
            np.save(tmp, work["null_text"])  # the temporary name ends in .npy: np.save adds nothing
    atomic_write_json(out / STAGING / f"{name}.json", sidecar)
    return {"shard": name}
