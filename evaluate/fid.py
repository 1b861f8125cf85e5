"""FID with torch-fidelity's Inception features, streamed batch by batch (DESIGN.md §7).

    features = FIDFeatures(weights_path=None, device="cuda")   # raises FIDUnavailable with the fix
    ref = reference_statistics(shard_set, features)            # cached inside the shard set
    fid = frechet_distance(statistics(torch.cat(sample_features)), ref)

torch-fidelity does the parts that decide the number: its TF1-compatible Inception ("inception-v3-compat",
2048-d pool features, its own resize from uint8), the mean/covariance (`fid_features_to_statistics`) and the
Fréchet distance (`fid_statistics_to_metric`). What it has no route for is streaming generated batches and
caching reference statistics keyed on *our* data: that is the little code here. Reference statistics always
come from this toolkit's own val images (the shard set's `png` members, same crop and resize as training);
never mix them with another library's (its Inception resize differs from pytorch-fid's).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
CACHE_DIR = "fid_reference"  # inside the shard set


class FIDUnavailable(RuntimeError):
    """The feature extractor's weights cannot be had; the message says how to provide them."""


class FIDFeatures:
    """uint8 images [B, 3, H, W] -> float32 CPU features [B, F] of torch-fidelity's FID layer."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: torch.device | str | None = None,
                 extractor: str = INCEPTION):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = extractor
        if extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise FIDUnavailable(f"unknown FID feature extractor {extractor!r}: torch-fidelity has "
                                 f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}")
        if weights_path is not None and not Path(weights_path).is_file():
            raise FIDUnavailable(f"no Inception weights at {weights_path}: download {INCEPTION_FILE} from "
                                 "torch-fidelity's releases and pass --inception-weights PATH")
        self.layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
        kwargs = {"feature_extractor_weights_path": str(weights_path)} if weights_path else {}
        try:
            self.model = torch_fidelity.utils.create_feature_extractor(
                extractor, [self.layer], cuda=self.device.type == "cuda", verbose=False, **kwargs)
        except (OSError, RuntimeError) as e:  # URLError is an OSError: no network, or a broken download
            raise FIDUnavailable(
                f"the Inception weights could not be loaded ({e}). Fix: run once with network "
                f"access (torch-fidelity downloads {INCEPTION_FILE} into $TORCH_HOME/hub/checkpoints/), or "
                f"copy that file there, or pass --inception-weights PATH") from e

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"FID features take uint8 images, got {images.dtype}")
        (features,) = self.model(images.to(self.device))
        return features.float().cpu()


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu": float32 [F], "sigma": float64 [F, F]}, torch-fidelity's own statistics."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
    return fid_features_to_statistics(features.float())


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    return float(fid_statistics_to_metric(stats_a, stats_b, verbose=False)[KEY_METRIC_FID])


def manifest_key(manifest: dict) -> str:
    """Changes whenever the shard set does: the manifest holds the config hash and every shard's checksum."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 [3, H, W]."""
    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def reference_statistics(shard_set, features: FIDFeatures, split: str = "val", batch_size: int = 64,
                         max_images: int | None = None) -> dict[str, np.ndarray]:
    """FID statistics of the shard set's `split` images (the first `max_images` in shard order, default
    all), cached in `<shards>/fid_reference/`.

    The cache file stores the manifest key it was computed from; a changed shard set (new manifest) or
    another feature extractor recomputes it. A read-only shard set still works, just without the cache.
    """
    limit = f"-first{max_images}" if max_images else ""
    cache = Path(shard_set.path) / CACHE_DIR / f"{split}-{features.name}{limit}.npz"
    key = manifest_key(shard_set.manifest)
    if cache.is_file():
        with np.load(cache) as f:
            if str(f["key"]) == key:
                return {"mu": f["mu"], "sigma": f["sigma"]}
        print(f"FID reference statistics {cache} belong to an older version of the shard set: recomputing")

    chunks, batch, skipped = [], [], 0
    used = 0
    for record in tqdm(shard_set.records(split), desc=f"FID reference ({split} images)", unit="img",
                       total=max_images):
        if max_images is not None and used == max_images:
            break
        if not record.get("png"):
            skipped += 1
            continue
        batch.append(decode_png(record["png"]))
        used += 1
        if len(batch) == batch_size:
            chunks.append(features(torch.stack(batch)))
            batch = []
    if batch:
        chunks.append(features(torch.stack(batch)))
    if skipped:
        print(f"FID reference: {skipped} {split} records have no png member and were left out")
    if not chunks:
        raise FIDUnavailable(f"the shard set {shard_set.path} has no {split} images (png members) for FID "
                             "reference statistics: rebuild it with the pipeline, which keeps them for val")
    stats = statistics(torch.cat(chunks))

    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + ".tmp.npz")
        np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], key=np.array(key))
        os.replace(tmp, cache)
    except OSError as e:
        print(f"could not cache FID reference statistics in {cache.parent} ({e}); they will be recomputed "
              "next time: make the shard set writable to keep them")
    return stats
