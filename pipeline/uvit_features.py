"""`python -m pipeline uvit-features`: U-ViT's extracted MS-COCO features as a standard shard set.

U-ViT's scripts/extract_mscoco_feature.py writes, per split folder (train/, val/), `{i}.npy` (SD-VAE moments
mean ‖ logvar, float32 [8, 32, 32] at 256 px, from assets/stable-diffusion/autoencoder_kl.pth) and `{i}_{k}.npy`
(the k-th caption's CLIP states, float32 [77, 768]); scripts/extract_empty_feature.py writes the null text
`empty_context.npy` at the root. Nothing is re-encoded: the arrays are checked and stored as float16 in the
format every other set has (shards/README.md). The set holds no images (FID needs --fid-ref) and caption
texts only when the COCO annotation files are given.

Image i of a split is the i-th image id in ascending order of the annotation file, and its captions come in
the order the file lists them: U-ViT's MSCOCODatabase iterates `sorted(coco.imgs)` and asks pycocotools for
`loadAnns(getAnnIds(id))`, which keeps file order. Every file read is untrusted (allow_pickle=False, dtype,
shape and finiteness checked); a bad one is listed in the manifest's `skipped` with its reason.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ifvit.errors import BadConfig, JobFailed, MissingPath
from ifvit.lock import FolderLock
from pipeline.encoders import PADDING_RULE, TEXT_LEN, parse_clip_spec
from pipeline.ldm_vae import is_ldm_vae_file
from pipeline.manifest import config_hash
from pipeline.sources import skip
from pipeline.stages import write_shard

SPLITS = ("train", "val")
MOMENTS_FILE, STATES_FILE = re.compile(r"(\d+)\.npy"), re.compile(r"(\d+)_(\d+)\.npy")
EMPTY_CONTEXT = "empty_context.npy"
ANNOTATION_FILES = {"train": "captions_train2014.json", "val": "captions_val2014.json"}
TEXT_ORIGIN = ("U-ViT's scripts/extract_mscoco_feature.py: transformers CLIPTextModel openai/clip-vit-large-patch14, "
               "last_hidden_state, padding='max_length' to 77 (libs/clip.py); the spec encodes new prompts identically")
IMAGE_ORIGIN = ("U-ViT's scripts/extract_mscoco_feature.py: encode_moments of "
                "assets/stable-diffusion/autoencoder_kl.pth on a center crop resized to the resolution "
                "(datasets.py center_crop); not re-encoded here")


def load_array(path: Path, shape: tuple, what: str) -> tuple[np.ndarray | None, str | None]:
    """(float16 array, None) or (None, the reason it cannot be used)."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None, "missing file"
    except (ValueError, OSError, EOFError) as e:  # pickled objects, a truncated or foreign file
        return None, f"unreadable .npy: {type(e).__name__}: {e}"
    if not isinstance(array, np.ndarray) or array.dtype not in (np.float16, np.float32, np.float64):
        return None, f"wrong dtype: {what} {getattr(array, 'dtype', type(array).__name__)}, expected float32"
    if array.shape != shape:
        return None, f"wrong shape: {what} {list(array.shape)}, expected {list(shape)}"
    array16 = array.astype(np.float16)
    if not (np.isfinite(array).all() and np.isfinite(array16).all()):
        return None, f"non-finite values: {what} (or values beyond float16)"
    return array16, None


def read_annotations(path: str | Path) -> tuple[list[int], dict[int, list]]:
    """(image ids in ascending order, {image id: captions in file order}) from a COCO captions file."""
    path = Path(path)
    if not path.is_file():
        raise MissingPath(f"no annotation file {path}: pass COCO 2014's annotations/captions_{{train,val}}2014.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ids = sorted({int(img["id"]) for img in data["images"]})  # pycocotools' imgs dict: one entry per id
        captions = defaultdict(list)
        for ann in data["annotations"]:
            captions[int(ann["image_id"])].append(ann["caption"])
    except (ValueError, KeyError, TypeError) as e:
        raise BadConfig(f"{path} is not a COCO captions file ({type(e).__name__}: {e}): it needs images[].id and "
                        "annotations[].image_id / .caption") from e
    return ids, captions


@dataclass
class UViTFeatureSource:
    root: str
    annotations: dict[str, str] | None = None  # split -> COCO captions file; None: no caption texts
    resolution: int = 256
    name = "uvit-features"

    def __post_init__(self):
        self.root = str(Path(self.root).resolve())
        if not Path(self.root).is_dir():
            raise MissingPath(f"no folder {self.root}: pass --root, U-ViT's feature folder "
                              "(assets/datasets/coco256_features, with train/ val/ empty_context.npy)")
        if self.annotations:
            self.annotations = {s: str(Path(p).resolve()) for s, p in self.annotations.items()}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (8, self.resolution // 8, self.resolution // 8)  # SD-VAE: 4 channels x (mean, logvar), /8

    def options(self) -> dict:
        files = {s: {"path": p, "bytes": Path(p).stat().st_size} for s, p in (self.annotations or {}).items()}
        return {"kind": self.name, "root": self.root, "resolution": self.resolution, "annotations": files or None}

    def null_text(self) -> np.ndarray:
        path = Path(self.root) / EMPTY_CONTEXT
        try:
            width = np.load(path, allow_pickle=False, mmap_mode="r").shape[-1]
        except (FileNotFoundError, ValueError, OSError, EOFError, IndexError) as e:
            raise MissingPath(f"no readable {EMPTY_CONTEXT} in {self.root} ({type(e).__name__}): U-ViT writes it "
                              "with scripts/extract_empty_feature.py; run that, it is the unconditional context") from e
        array, why = load_array(path, (TEXT_LEN, width), EMPTY_CONTEXT)
        if why:
            raise BadConfig(f"{path}: {why}: it must be the [77, D] CLIP states of the empty caption")
        return array

    def rows(self) -> tuple[list[dict], list[dict]]:
        rows, skipped = [], []
        for split in SPLITS:
            folder = Path(self.root) / split
            if not folder.is_dir():
                raise MissingPath(f"no {split}/ in {self.root}: U-ViT's extractor writes train/ and val/ "
                                  f"(python scripts/extract_mscoco_feature.py --split {split})")
            rows_of_split, skipped_of_split = self._split_rows(split, folder)
            rows += rows_of_split
            skipped += skipped_of_split
        return rows, skipped

    def _split_rows(self, split: str, folder: Path) -> tuple[list[dict], list[dict]]:
        moments, states, skipped = set(), defaultdict(list), []
        for name in sorted(os.listdir(folder)):
            if m := MOMENTS_FILE.fullmatch(name):
                moments.add(int(m.group(1)))
            elif m := STATES_FILE.fullmatch(name):
                states[int(m.group(1))].append(int(m.group(2)))
            else:
                skipped.append(skip(f"{split}/{name}", "not a U-ViT feature file: expected {i}.npy or {i}_{k}.npy",
                                    split=split, source_file=f"{split}/{name}"))
        ids, captions = self._annotations(split, moments)
        count = len(ids) if ids else max(moments, default=-1) + 1
        for i in sorted(i for i in set(states) - moments if i >= count):  # below count: "missing file" below
            skipped.append(skip(self._key(split, i, ids), f"caption states without an image: no {i}.npy",
                                split=split, source_file=f"{split}/{i}_0.npy"))
        rows = []
        for i in range(count):
            key = self._key(split, i, ids)
            row = {"key": key, "split": split, "id": ids[i] if ids else i, "index": i,
                   "source_file": f"{split}/{i}.npy", "states": sorted(states.get(i, [])),
                   "captions": captions.get(ids[i], []) if ids else None}
            if i not in moments:
                skipped.append(skip(row, "missing file"))
            elif not row["states"]:
                skipped.append(skip(row, "no captions: no {i}_{k}.npy state files"))
            elif ids and len(row["captions"]) != max(row["states"]) + 1:
                skipped.append(skip(row, f"caption count mismatch: {max(row['states']) + 1} state files but "
                                         f"{len(row['captions'])} captions in the annotations, so the pairing "
                                         "cannot be trusted"))
            else:
                rows.append(row)
        return rows, skipped

    def _annotations(self, split: str, moments: set[int]) -> tuple[list[int] | None, dict]:
        if not self.annotations:
            return None, {}
        ids, captions = read_annotations(self.annotations[split])
        # A few missing files are skipped one by one; more images than the file lists, or most of its images
        # absent, means another file than the one U-ViT extracted from: every pairing would be wrong.
        if max(moments, default=-1) >= len(ids) or len(moments) < len(ids) / 2:
            raise BadConfig(f"{self.annotations[split]} lists {len(ids):,} images, but {split}/ holds moments for "
                            f"{len(moments):,} (up to index {max(moments, default=-1)}): U-ViT numbers the images of "
                            f"the annotation file it extracted from, so pass that file ({ANNOTATION_FILES[split]} "
                            f"for {split}/)")
        return ids, captions

    @staticmethod
    def _key(split: str, i: int, ids: list[int] | None) -> str:
        # With annotations, the COCO key of `python -m pipeline coco`; without, the split and U-ViT's index.
        return f"{ids[i]:012d}" if ids and i < len(ids) else f"{split}-{i:06d}"


def load_shard(work: dict, source: UViTFeatureSource, null_text: np.ndarray) -> dict:
    """One shard's rows -> the work dict pipeline.stages.write_shard writes (no images, no re-encoding)."""
    root = Path(source.root)
    records, latents, texts, skipped = [], [], [], []
    for row in work["rows"]:
        latent, why = load_array(root / row["source_file"], source.latent_shape, "moments")
        if why:
            skipped.append(skip(row, why))
            continue
        kept, kept_captions, kept_files = [], [], []
        for k in range(max(row["states"]) + 1):
            file = f"{row['split']}/{row['index']}_{k}.npy"
            state, why = load_array(root / file, null_text.shape, "caption states") if k in row["states"] \
                else (None, "missing file")
            caption = row["captions"][k] if row["captions"] is not None else None
            if why is None and caption is not None and not isinstance(caption, str):
                why = f"caption is not text: {caption!r}"
            if why:  # that caption only, as an empty caption is dropped elsewhere; the image keeps the others
                skipped.append(skip(row, why, caption=k, source_file=file))
                continue
            kept.append(state)
            kept_captions.append(caption)
            kept_files.append(file)
        if not kept:
            skipped.append(skip(row, "no captions: no usable caption states"))
            continue
        record = {"key": row["key"], "id": row["id"], "source_file": row["source_file"], "split": row["split"],
                  # None, not [], without annotation files: the states exist, their texts are unknown
                  "captions": kept_captions if row["captions"] is not None else None,
                  "caption_files": kept_files, "uvit_index": row["index"]}
        records.append(record)
        latents.append(latent)
        texts.append(np.stack(kept))
    return {"name": work["name"], "split": work["split"], "records": records, "latents": latents, "texts": texts,
            "pngs": [None] * len(records), "skipped": skipped, "truncated": [],
            "stats": latent_stats(latents, work["name"]), "identities": work["identities"], "null_text": null_text}


def latent_stats(latents: list[np.ndarray], name: str) -> list:
    """Running sums of a posterior sample, as the encoding job keeps them (the manifest's latent_std)."""
    if not latents:
        return [0.0, 0.0, 0]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    mean, logvar = np.split(np.stack(latents).astype(np.float64), 2, axis=1)
    z = mean + np.exp(0.5 * np.clip(logvar, -30, 20)) * rng.standard_normal(mean.shape)
    return [float(z.sum()), float(np.square(z).sum()), int(z.size)]


def identities(source: UViTFeatureSource, vae: str, clip: str, text_dim: int) -> dict:
    model, pretrained = parse_clip_spec(clip)
    decoder = ("U-ViT's own decoder" if is_ldm_vae_file(vae) else
               "U-ViT decodes with autoencoder_kl.pth: pass --vae FILE.pth to decode as it does")
    return {"image": {"kind": "sd-vae", "spec": vae, "latent_format": "moments", "weights_sha256": None,
                      "encoded_by": IMAGE_ORIGIN, "decoder": decoder},
            "text": {"kind": "clip", "spec": clip, "model": model, "pretrained": pretrained, "weights_sha256": None,
                     "dtype": "float16", "text_len": TEXT_LEN, "text_dim": text_dim, "padding": PADDING_RULE,
                     "encoded_by": TEXT_ORIGIN}}


def run(source: UViTFeatureSource, cfg, workers: int | None = None) -> dict:
    """Build (or finish, or find up to date) the shard set `cfg.out` (a pipeline.job.JobConfig); locked."""
    with FolderLock(cfg.out, f"python -m pipeline {source.name} --out {cfg.out}"):
        return _build(source, cfg, workers)


def _build(source: UViTFeatureSource, cfg, workers: int | None) -> dict:
    from pipeline.executors import pool_context
    from pipeline.job import (StrictModeError, build_manifest, finish_set, finished_set, plan_shards,
                              prepare_staging, print_summary)

    start, out = time.time(), Path(cfg.out)
    chash = config_hash(cfg.hashed(source))
    if (manifest := finished_set(out, chash)) is not None:
        return manifest
    null_text = source.null_text()  # inputs first: a wrong --root or annotation file leaves nothing behind
    rows, listing_skipped = source.rows()
    staging = prepare_staging(out, chash, cfg.hashed(source))

    plan = plan_shards(rows, cfg.shard_size, cfg.limit)
    if not plan:
        raise BadConfig(f"{source.root} holds no usable U-ViT features ({{i}}.npy with {{i}}_{{k}}.npy in train/ and "
                        f"val/); {len(listing_skipped)} file(s) rejected while listing")
    ids = identities(source, cfg.image_encoder, cfg.text_encoder, null_text.shape[1])
    todo = [{"name": s["name"], "split": s["split"], "rows": s["rows"], "identities": ids} for s in plan
            if not ((staging / f"{s['name']}.json").is_file() and (out / s["name"]).is_file())]
    if cfg.strict and listing_skipped:
        raise StrictModeError(f"--strict: {len(listing_skipped)} input(s) rejected while listing, first: "
                              f"{listing_skipped[0]}")
    if len(todo) < len(plan):
        print(f"resuming: {len(plan) - len(todo)} of {len(plan)} shards already written, {len(todo)} to go")

    convert = _Converter(source, null_text, str(out))
    if (workers or 1) > 1 and len(todo) > 1:
        with pool_context().Pool(workers) as pool:  # many small files: I/O-bound, so several readers at once
            for _ in pool.imap_unordered(convert, todo):
                pass
    else:
        for work in todo:
            convert(work)

    sidecars = [json.loads((staging / f"{s['name']}.json").read_text()) for s in plan]
    if not any(s["records"] for s in sidecars):
        raise JobFailed(f"every input was skipped; see the reasons in {staging}/*.json")
    inputs = sum(len(s["rows"]) for s in plan)
    manifest = build_manifest(source, cfg, chash, plan, sidecars, listing_skipped, cfg.text_encoder, inputs)
    manifest["image_encoder"]["preprocessing"] = IMAGE_ORIGIN
    manifest["stores_images"] = False  # evaluate: FID needs --fid-ref (U-ViT's fid_stats_mscoco256_val.npz)
    manifest["captions_available"] = source.annotations is not None  # without them: no CLIP score
    converted, seconds = sum(len(s["rows"]) for s in todo), time.time() - start
    manifest["timing"] = {"executor": "local", "seconds": seconds, "images_encoded": converted,
                          "images_per_s": converted / max(seconds, 1e-9), "verb": "converted (not re-encoded)"}
    if cfg.strict and manifest["skipped"]:
        print_summary(manifest)
        raise StrictModeError(f"--strict: {len(manifest['skipped'])} input(s) skipped (listed above)")
    finish_set(out, manifest)
    print_summary(manifest)
    if not manifest["captions_available"]:
        print("  captions   none (no --annotations): the set trains and samples, but has no CLIP score")
    return manifest


class _Converter:
    """Picklable per-shard task for the pool."""

    def __init__(self, source, null_text, out):
        self.source, self.null_text, self.out = source, null_text, out

    def __call__(self, work: dict) -> None:
        write_shard({"work": pickle.dumps(load_shard(work, self.source, self.null_text))}, self.out)
