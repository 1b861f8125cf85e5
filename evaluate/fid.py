"""FID with torch-fidelity's Inception features, streamed batch by batch (docs/sampling.md, "FID reference statistics").

    features = FIDFeatures(weights_path=None, device="cuda")   # raises FIDUnavailable with the fix
    ref = reference_statistics(shard_set, features)            # cached in ~/.cache/ifvit (or $IFVIT_CACHE)
    ref = load_statistics("fid_stats_mscoco256_val.npz", features)   # or a pytorch-fid / U-ViT file
    fid = frechet_distance(statistics(torch.cat(sample_features)), ref)

torch-fidelity does the parts that decide the number: its TF1-compatible Inception ("inception-v3-compat",
2048-d pool features, its own resize from uint8), the mean/covariance (`fid_features_to_statistics`) and the
Fréchet distance (`fid_statistics_to_metric`). What it has no route for is streaming generated batches and
caching reference statistics keyed on *our* data: that is the little code here.

Statistics files are pytorch-fid's format -- an .npz with `mu` [F] and `sigma` [F, F], both float64 -- plus a
`features` entry naming the extractor (and `key`, the shard set's, for the cache), so pytorch-fid, U-ViT's
scripts and this toolkit read each other's files. The rule for comparing: FID against a reference is only
meaningful when the samples went through the same feature path as the reference images. pytorch-fid (which
made U-ViT's files) resizes with torch's bilinear interpolation and scales pixels to x/127.5 - 1, torch-fidelity
resizes like TensorFlow 1 and scales to (x - 128)/128: against a pytorch-fid file use `--fid-features
pytorch-fid` (when the pytorch-fid package is installed).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from tqdm import tqdm

from evaluate.images import load_png
from ifvit.errors import UserError
from ifvit.files import atomic_path, cache_dir as cache_dir_of

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
PYTORCH_FID = "pytorch-fid"  # pytorch-fid's own Inception path (optional package), the one U-ViT's FIDs used
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
CACHE_DIR = "fid_reference"  # inside the cache folder (ifvit.files.cache_dir), one subfolder per shard set


class FIDUnavailable(RuntimeError):
    """The feature extractor's weights cannot be had; the message says how to provide them."""


class FIDFeatures:
    """uint8 images [B, 3, H, W] -> float32 CPU features [B, F] of torch-fidelity's FID layer (or, with
    extractor="pytorch-fid", of pytorch-fid's Inception)."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: torch.device | str | None = None,
                 extractor: str = INCEPTION):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = extractor
        self._dims = None
        if extractor == PYTORCH_FID:
            self.model = _pytorch_fid_inception(weights_path, self.device)
            return
        if extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise FIDUnavailable(f"unknown FID feature extractor {extractor!r}: torch-fidelity has "
                                 f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}, and {PYTORCH_FID!r} needs the "
                                 "pytorch-fid package")
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
        if self.name == PYTORCH_FID:
            # What pytorch-fid feeds its network: ToTensor() of the PNG, i.e. uint8 / 255; the network resizes.
            (pooled,) = self.model(images.to(self.device).float() / 255)
            return pooled[:, :, 0, 0].float().cpu()
        (features,) = self.model(images.to(self.device))
        return features.float().cpu()

    @property
    def dims(self) -> int:
        """F, the feature width (one probe image the first time)."""
        if self._dims is None:
            self._dims = self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1]
        return self._dims


def _pytorch_fid_inception(weights_path, device: torch.device):
    """pytorch-fid's InceptionV3 (2048-d pool features, its own resize and normalisation), if installed."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError as e:
        raise FIDUnavailable("--fid-features pytorch-fid needs the pytorch-fid package: pip install "
                             "pytorch-fid (it is optional; the default torch-fidelity features need nothing)") from e
    if weights_path is not None:
        raise FIDUnavailable(f"--inception-weights is torch-fidelity's file; pytorch-fid reads its own "
                             f"{PYTORCH_FID_FILE} from $TORCH_HOME/hub/checkpoints/: copy it there instead")
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise FIDUnavailable(f"pytorch-fid's Inception weights could not be loaded ({e}). Fix: run once with "
                             f"network access, or copy {PYTORCH_FID_FILE} into $TORCH_HOME/hub/checkpoints/") from e
    return model.eval().to(device)


def statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """{"mu": float32 [F], "sigma": float64 [F, F]}, torch-fidelity's own statistics."""
    if features.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images, got {features.shape[0]}")
    return fid_features_to_statistics(features.float())


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """torch-fidelity's Fréchet distance, in float64 (pytorch-fid files hold float64 mu, ours float32)."""
    a, b = ({k: np.asarray(st[k], dtype=np.float64) for k in ("mu", "sigma")} for st in (stats_a, stats_b))
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"FID statistics of {a['mu'].shape[0]}-d and {b['mu'].shape[0]}-d features cannot be "
                         "compared: compute both with the same feature extractor")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


class FIDReferenceError(UserError, ValueError):
    """A reference statistics file that cannot be used; the message says why and what to pass."""


def save_statistics(path: str | os.PathLike, stats: dict, features: str, **extra) -> Path:
    """pytorch-fid's .npz (mu, sigma as float64) plus `features` (the extractor's name), written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:  # the temporary name keeps the .npz suffix, so savez adds none
        np.savez(tmp, mu=np.asarray(stats["mu"], dtype=np.float64),
                 sigma=np.asarray(stats["sigma"], dtype=np.float64), features=np.array(features),
                 **{k: np.array(v) for k, v in extra.items()})
    return path


def load_statistics(path: str | os.PathLike, features: FIDFeatures | None = None) -> tuple[dict, str | None]:
    """({"mu", "sigma"} float64, warning or None) from a pytorch-fid / U-ViT / ifvit .npz.

    Nothing in the file is executed (allow_pickle=False); shapes, dtypes and finiteness are checked, and the
    width against `features`. A file of this toolkit's with another extractor is refused; a file without the
    `features` entry (pytorch-fid's, U-ViT's) is used with a warning unless `features` is pytorch-fid's.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"mu", "sigma"} - set(f.files)
            if missing:
                raise FIDReferenceError(f"{path} has no {' or '.join(sorted(missing))}: an FID reference is an .npz "
                                        f"with mu [F] and sigma [F, F] (pytorch-fid's format); it holds {f.files}")
            mu, sigma = f["mu"], f["sigma"]
            made_with = str(f["features"]) if "features" in f.files else None
    except FIDReferenceError:
        raise
    except FileNotFoundError as e:
        raise FIDReferenceError(f"no FID reference file at {path}: pass --fid-ref FILE.npz") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not an .npz, or pickled (object) arrays
        raise FIDReferenceError(f"{path} is not a readable statistics .npz ({e}): it must hold plain float "
                                "arrays mu and sigma, as pytorch-fid's `--save-stats` writes") from e
    for name, array in (("mu", mu), ("sigma", sigma)):
        if array.dtype not in (np.float32, np.float64):
            raise FIDReferenceError(f"{path}: {name} is {array.dtype}, expected float32 or float64")
        if not np.isfinite(array).all():
            raise FIDReferenceError(f"{path}: {name} has non-finite values")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDReferenceError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [F] and [F, F]")
    if features is not None and mu.shape[0] != features.dims:
        raise FIDReferenceError(f"{path} holds {mu.shape[0]}-d statistics, but the {features.name} features are "
                                f"{features.dims}-d: pass the --fid-features the file was made with")
    warning = None
    if made_with is not None and features is not None and made_with != features.name:
        raise FIDReferenceError(f"{path} was computed with {made_with} features, this evaluation uses "
                                f"{features.name}: pass --fid-features {made_with}")
    if made_with is None and (features is None or features.name != PYTORCH_FID):
        warning = (f"{path} was not written by this toolkit (no 'features' entry): if it comes from pytorch-fid "
                   "(U-ViT's fid_stats files do), its Inception resizes and scales images differently from "
                   f"torch-fidelity's {INCEPTION}, so FID against it is not U-ViT's number; pass "
                   "--fid-features pytorch-fid (pip install pytorch-fid) to compute the samples' side alike")
    return {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}, warning


def manifest_key(manifest: dict) -> str:
    """Changes whenever the shard set does: the manifest holds the config hash and every shard's checksum."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:16]


def decode_png(data: bytes) -> torch.Tensor:
    """PNG bytes -> uint8 [3, H, W]."""
    return load_png(io.BytesIO(data))


def reference_cache(shard_set, features: FIDFeatures, split: str, max_images: int | None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the reference statistics of (shard set, split, extractor, image count) are cached: under the
    cache folder (--cache-dir, $IFVIT_CACHE, ~/.cache/ifvit), never inside the shard set, which is the
    pipeline's finished product. One subfolder per shard-set location (its name and a hash of its absolute
    path); the file inside remembers the manifest it was computed from."""
    where = Path(shard_set.path).resolve()
    folder = f"{where.name}-{hashlib.sha256(str(where).encode()).hexdigest()[:12]}"
    limit = f"-first{max_images}" if max_images else ""
    return cache_dir_of(cache_dir) / CACHE_DIR / folder / f"{split}-{features.name}{limit}.npz"


def require_images(shard_set) -> None:
    """FIDUnavailable, naming --fid-ref, for a set without images (e.g. built from U-ViT's extracted features)."""
    if shard_set.manifest.get("stores_images", True) is False:
        raise FIDUnavailable(f"the shard set {shard_set.path} holds no images to compute FID reference statistics "
                             "from (built from U-ViT's features): pass --fid-ref FILE.npz (for U-ViT's "
                             "fid_stats_mscoco256_val.npz also --fid-features pytorch-fid)")


def reference_statistics(shard_set, features: FIDFeatures, split: str = "val", batch_size: int = 64,
                         max_images: int | None = None,
                         cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """FID statistics of the shard set's `split` images (the first `max_images` in shard order, default
    all), cached (`reference_cache`). The cache file also stores the manifest key it was computed from and
    is recomputed when that differs; an unwritable cache folder only costs the recomputation next time."""
    require_images(shard_set)
    cache = reference_cache(shard_set, features, split, max_images, cache_dir)
    key = manifest_key(shard_set.manifest)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if "key" in f.files and str(f["key"]) == key:
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
                             "reference statistics: rebuild it with the pipeline, which keeps them for val, or pass "
                             "--fid-ref FILE.npz")
    stats = statistics(torch.cat(chunks))

    try:
        save_statistics(cache, stats, features.name, key=key)  # also a pytorch-fid file: --fid-ref takes it
    except OSError as e:
        print(f"could not cache FID reference statistics in {cache.parent} ({e}); they will be recomputed "
              "next time: pass --cache-dir DIR (or set IFVIT_CACHE) to a writable folder to keep them")
    return stats
