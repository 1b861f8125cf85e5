"""Read a shard set: its manifest, null-text context, latent scale and a WebDataset stream of batches.

This is the only module `train` imports from the pipeline (docs/CONTRACTS.md §2). It needs torch and numpy
at import time; webdataset only when a stream is built, so `to_model_input` works on a torch-only machine.

    ss = ShardSet("shards/shapes")
    for batch in ss.loader("train", batch_size=64, seed=0):        # infinite, resampled
        x = to_model_input(batch["latent"].to(dev, non_blocking=True), ss.latent_format, ss.latent_scale)
        context = batch["text"].to(dev, non_blocking=True).float()   # [B, 77, D], one caption per image
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.manifest import NULL_TEXT, load_manifest

SHUFFLE_BUFFER = 2_000  # samples per loader worker: ~1.2 GB of COCO records at most, enough to mix shards


def to_model_input(latent: torch.Tensor, latent_format: str, scale: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Stored latents -> what the model denoises, float32 on the latent's device.

    moments: a fresh posterior sample (mean + exp(0.5 * clamp(logvar, -30, 20)) * eps) times the scale, as
    U-ViT and SD do; pixels: the values times the scale (1.0)."""
    latent = latent.float()
    if latent_format == "pixels":
        return latent * scale
    if latent_format != "moments":
        raise ValueError(f"unknown latent format {latent_format!r}: expected 'moments' or 'pixels'")
    mean, logvar = latent.chunk(2, dim=1)
    eps_device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=eps_device).to(mean.device)
    return (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * scale


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardSet:
    """A finished shard set written by `python -m pipeline` (format: shards/README.md)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        image, text = self.manifest["image_encoder"], self.manifest["text_encoder"]
        self.latent_format: str = image["latent_format"]
        self.latent_channels: int = image["model_latent_shape"][0]
        self.latent_size: int = image["model_latent_shape"][-1]
        self.latent_scale: float = float(image["latent_scale"])
        self.text_len: int = text["text_len"]
        self.text_dim: int = text["text_dim"]
        self.splits: list[str] = [s for s, info in self.manifest["splits"].items() if info["records"] > 0]

    @property
    def is_shapes(self) -> bool:
        """Built from the embedded `shapes` generator: records carry their exact scene, the judge applies.
        The one place that decides it (evaluate asks here)."""
        return self.manifest.get("source", {}).get("kind") == "shapes"

    @property
    def has_captions(self) -> bool:
        """Records carry their caption texts (False for U-ViT features converted without annotation files:
        text states only, so no CLIP score)."""
        return self.manifest.get("captions_available", True)

    @property
    def stores_images(self) -> bool:
        """Val records carry PNGs for FID reference statistics (False for U-ViT features: pass --fid-ref)."""
        return self.manifest.get("stores_images", True)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s} {self.manifest['splits'][s]['records']}" for s in self.splits)
        return (f"ShardSet({str(self.path)!r}: {counts}; {self.latent_format} "
                f"{self.latent_channels}x{self.latent_size}x{self.latent_size}, text {self.text_len}x{self.text_dim})")

    def shard_paths(self, split: str) -> list[str]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"no split {split!r} in {self.path}: it has {', '.join(self.manifest['splits'])}")
        return [str(self.path / name) for name in self.manifest["splits"][split]["shards"]]

    def num_records(self, split: str) -> int:
        return self.manifest["splits"][split]["records"]

    def null_text(self) -> torch.Tensor:
        """float32 [text_len, text_dim]: the encoding of "" (the unconditional context, not zeros)."""
        return torch.from_numpy(np.load(self.path / NULL_TEXT).astype(np.float32))

    def text_encoder(self, device: str | torch.device = "cpu"):
        """The encoder that wrote `text.npy`, to encode new prompts identically (saved weights included)."""
        from pipeline.encoders import load_text_encoder

        spec = self.manifest["text_encoder"]["spec"]
        if spec.startswith("local-dir:") and not Path(spec[len("local-dir:"):]).is_absolute():
            spec = f"local-dir:{self.path / spec[len('local-dir:'):]}"
        return load_text_encoder(spec, device)

    def image_codec(self, device: str | torch.device = "cpu", vae: str | None = None):
        """The set's codec; `vae` (a --vae spec: hub id, folder, ldm FILE.pth) swaps in another decoder for
        the same moments, e.g. U-ViT's autoencoder_kl.pth, keeping the set's latent scale."""
        from ifvit.errors import BadConfig
        from pipeline.encoders import load_image_codec

        if vae is None:
            return load_image_codec(self.manifest["image_encoder"], device)
        if self.latent_format != "moments":
            raise BadConfig(f"--vae {vae}: {self.path} stores {self.latent_format}, not VAE moments; leave --vae out")
        return load_image_codec(vae, device, scale=self.latent_scale)

    def records(self, split: str):
        """Every record of `split` in shard order, decoded: dicts with key, json, latent, text [K, 77, D] and
        png bytes (val/holdout). Not split by node or worker: each caller sees the whole split."""
        import webdataset as wds

        stream = wds.DataPipeline(wds.SimpleShardList(self.shard_paths(split)), wds.tarfile_to_samples())
        for sample in stream:
            yield {"key": sample["__key__"], "json": json.loads(sample["json"]),
                   "latent": _load_npy(sample["latent.npy"]), "text": _load_npy(sample["text.npy"]),
                   **({"png": sample["png"]} if "png" in sample else {})}

    def loader(self, split: str = "train", batch_size: int = 64, seed: int = 0, num_workers: int = 2,
               resampled: bool = True, shuffle_buffer: int = SHUFFLE_BUFFER):
        """Batches {"latent": float16 [B, 2C|C, S, S], "text": float16 [B, 77, D], "key": list[str]}.

        resampled=True (training): an infinite stream; each (rank, worker) draws shards with its own seed
        derived from `seed`, rank and worker id (webdataset's ResampledShards), so ranks never repeat each
        other's order. resampled=False: one pass, shards split by node (torchrun rank) then by worker.
        One caption per image is picked before the shuffle buffer; batches are built in the workers and
        the last partial batch of each worker is dropped, so every batch has the same shape."""
        import webdataset as wds

        urls = self.shard_paths(split)
        if resampled:
            shards = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
        else:
            shards = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        stream = wds.DataPipeline(
            *shards,
            wds.tarfile_to_samples(),
            _pick_one_caption(seed),
            wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 500), seed=seed),
            wds.batched(batch_size, collation_fn=_collate, partial=False),
        )
        return wds.WebLoader(stream, batch_size=None, num_workers=num_workers,
                             pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)


def _pick_one_caption(seed: int):
    """Pipeline stage: decode a sample and keep one of its K captions, drawn with a per-worker RNG."""
    import webdataset as wds

    def stage(samples):
        rng = random.Random(f"{seed}/{wds.utils.pytorch_worker_seed()}")  # rank * 1000 + worker
        for sample in samples:
            text = _load_npy(sample["text.npy"])
            yield {"key": sample["__key__"], "latent": _load_npy(sample["latent.npy"]),
                   "text": text[rng.randrange(len(text))]}

    return stage


def _collate(samples: list[dict]) -> dict:
    return {"latent": torch.from_numpy(np.stack([s["latent"] for s in samples])),
            "text": torch.from_numpy(np.stack([s["text"] for s in samples])),
            "key": [s["key"] for s in samples]}
