"""`python -m pipeline bench`: encoder and loader throughput on the device at hand (JSON with --json).

    vae_encoder   images/s at 256 px through the real SD-VAE encoder architecture (random weights)
    text_tower    captions/s through the real ViT-L/14 text tower (open_clip ViT-L-14-quickgelu, random
                  weights), plus the CPU-side tokenizer's captions/s
    loader        samples/s of ShardSet.loader over a COCO-shaped shard set (8x32x32 moments, 5 captions of
                  77x768; ~600 KB a record), synthetic unless --shards names a real one

Random weights run at the speed of trained ones, so this needs no download. Encoders run in float32 (TF32
on a GPU), as the pipeline runs them.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.encoders import DEFAULT_CLIP_ARCH, SD_VAE_CONFIG, TextEncoder
from ifvit.files import atomic_write_json
from pipeline.manifest import MANIFEST, NULL_TEXT
from pipeline.reader import ShardSet

CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two dogs playing with a frisbee in a grassy park.",
            "A kitchen with wooden cabinets and a stainless steel refrigerator.",
            "A red double decker bus driving down a city street next to tall buildings."]


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call after warm-up (synchronising a GPU so the clock measures the work)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


@torch.no_grad()
def bench_vae(device: torch.device, batch: int, iters: int, config: dict = SD_VAE_CONFIG,
              resolution: int = 256) -> dict:
    """SD-VAE encoder images/s (`config`: another AutoencoderKL architecture, e.g. a toy one for a smoke run)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config).to(device).eval()
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    seconds = timed(lambda: vae.encode(x).latent_dist.parameters, int(device.type == "cuda"), iters, device)
    return {"images_per_s": batch / seconds, "batch": batch, "resolution": resolution, "dtype": "float32",
            "encoder_params": sum(p.numel() for p in vae.encoder.parameters()) +
                              sum(p.numel() for p in vae.quant_conv.parameters())}


def bench_text(device: torch.device, batch: int, iters: int, model=None) -> dict:
    """Text tower captions/s: ViT-L/14's unless `model` is another open_clip CLIP (e.g. a toy one)."""
    import open_clip

    model = model if model is not None else open_clip.create_model(DEFAULT_CLIP_ARCH, pretrained=None)
    encoder = TextEncoder(model, open_clip.get_tokenizer(DEFAULT_CLIP_ARCH), f"{DEFAULT_CLIP_ARCH}:random", device)
    captions = [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(batch)]
    tokens, _ = encoder.tokenize(captions)
    seconds = timed(lambda: encoder.encode_tokens(tokens), int(device.type == "cuda"), iters, device)
    tokenize_seconds = timed(lambda: encoder.tokenize(captions), 0, 1, torch.device("cpu"))
    return {"captions_per_s": batch / seconds, "batch": batch, "text_dim": encoder.dim, "dtype": "float32",
            "text_params": sum(p.numel() for p in encoder.model.parameters()),
            "tokenize_captions_per_s": batch / tokenize_seconds}


def write_coco_shaped_set(root: Path, records: int, per_shard: int = 250) -> Path:
    """A synthetic shard set with COCO's record sizes, readable by ShardSet (not by verify: no encoders)."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((8, 32, 32)).astype(np.float16)
    text = rng.standard_normal((5, 77, 768)).astype(np.float16)
    shards = []
    for start in range(0, records, per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(start, min(start + per_shard, records)):
                sink.write({"__key__": f"{i:012d}", "latent.npy": latent, "text.npy": text,
                            "json": {"key": f"{i:012d}", "captions": ["synthetic"] * 5}})
        shards.append(name)
    np.save(root / NULL_TEXT, text[0])
    atomic_write_json(root / MANIFEST, {
        "format_version": 1, "splits": {"train": {"shards": shards, "records": records, "captions": 5 * records}},
        "image_encoder": {"latent_format": "moments", "latent_shape": [8, 32, 32], "model_latent_shape": [4, 32, 32],
                          "latent_scale": 0.2301, "spec": "synthetic"},
        "text_encoder": {"text_len": 77, "text_dim": 768, "spec": "synthetic"}})
    return root


def bench_loader(path: Path, batch: int, workers: list[int], batches: int) -> list[dict]:
    ss = ShardSet(path)
    out = []
    for num_workers in workers:
        it = iter(ss.loader("train", batch_size=batch, num_workers=num_workers, shuffle_buffer=500))
        next(it)  # workers started, shuffle buffer primed
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        out.append({"num_workers": num_workers, "batch": batch,
                    "samples_per_s": batch * batches / (time.perf_counter() - start)})
        del it
    return out


def main(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    gpu, cores = device.type == "cuda", os.cpu_count() or 1
    iters = 10 if gpu and not args.quick else 1 if args.quick else 3
    result = {"device": torch.cuda.get_device_name(device) if gpu else f"CPU ({cores} cores)",
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"bench on {result['device']}", flush=True)
    result["vae_encoder"] = bench_vae(device, batch=32 if gpu else 1 if args.quick else 4, iters=iters)
    print(f"  SD-VAE encoder, 256 px:   {result['vae_encoder']['images_per_s']:9.1f} images/s", flush=True)
    result["text_tower"] = bench_text(device, batch=512 if gpu else 8 if args.quick else 32, iters=iters)
    print(f"  ViT-L/14 text tower:      {result['text_tower']['captions_per_s']:9.1f} captions/s "
          f"(tokenizer {result['text_tower']['tokenize_captions_per_s']:.0f}/s on one CPU core)", flush=True)
    workers = sorted({1, min(cores, 8)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.shards) if args.shards else write_coco_shaped_set(Path(tmp), 500 if args.quick else 2000)
        result["loader"] = bench_loader(path, batch=64, workers=workers, batches=5 if args.quick else 30)
        result["loader_shards"] = str(args.shards or "synthetic COCO-shaped (8x32x32 moments, 5x77x768 text)")
    for row in result["loader"]:
        print(f"  loader, {row['num_workers']} worker(s):      {row['samples_per_s']:9.1f} samples/s", flush=True)
    if args.json:
        atomic_write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return result
