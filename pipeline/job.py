"""The encoding job: a source's captioned images into a WebDataset shard set (docs/pipeline.md).

    driver    list the source's rows -> cut each split into shards of `shard_size` rows, in order
              -> leave out shards a previous (killed) run already finished: their sidecar exists
    executor  load, convert, crop, resize     CPU work, one shard at a time
              encode images and captions      one encoder per GPU (or a CPU one)
              write the tar, then its sidecar CPU work (temporary name + os.replace)
    driver    tqdm over finished shards -> manifest.json, written last -> summary
The driver holds the shard set's folder lock (ifvit.lock) from start to end: a second job into the same
--out stops at once, naming the first.

The executor is Ray Data (clusters, multi-node) or this process with a multiprocessing pool (one machine
without Ray); pipeline/executors.py runs either over the same stages, pipeline/stages.py. A shard is the
unit of work and of resumption. Its rows are fixed by the plan and its tar appears only whole, so running
the same command after a kill writes exactly the missing shards: every key ends up in the set exactly once.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ifvit.errors import BadConfig, JobFailed
from ifvit.files import atomic_path, atomic_write_json, is_temporary
from ifvit.lock import FolderLock
from pipeline.encoders import DEFAULT_CLIP, DEFAULT_VAE
from pipeline.executors import absolute_spec, choose_executor, run_local, run_ray
from pipeline.ldm_vae import UVIT_LATENT_SCALE, is_ldm_vae_file
from pipeline.manifest import FORMAT_VERSION, MANIFEST, NULL_TEXT, STAGING, TEXT_ENCODER_DIR, config_hash, load_manifest
from pipeline.sources import Preprocess

RANDOM_TEXT_ENCODER = "random"  # --clip random: a seeded random CLIP text tower saved inside the set
PAPER_COCO_SCALE = UVIT_LATENT_SCALE  # U-ViT's latent scale for SD-VAE on MS-COCO 256 (1 / std of its latents)


@dataclass
class JobConfig:
    out: str
    image_encoder: str = DEFAULT_VAE  # "pixels", a diffusers hub id or a local AutoencoderKL folder
    text_encoder: str = DEFAULT_CLIP  # an open_clip spec (pipeline/encoders.py) or "random"
    preprocess: Preprocess = field(default_factory=Preprocess)
    shard_size: int = 500
    limit: int | None = None  # keep the first N images of each split
    latent_scale: float | None = None  # None: 1 for pixels, the paper's value for COCO + SD-VAE, else 1/std
    seed: int = 0  # the random text tower's initialisation and the latent-std sample
    # How to run; these do not change the output, so they are not part of the config hash.
    batch_size: int = 64
    executor: str = "auto"  # "ray" | "local" | "auto": ray where it is installed, else local
    workers: int | None = None  # the local executor's load/write processes (None: every core)
    ray_address: str | None = None
    strict: bool = False

    def hashed(self, source) -> dict:
        keep = ("image_encoder", "text_encoder", "preprocess", "shard_size", "limit", "latent_scale", "seed")
        return {"source": source.options(), **{k: v for k, v in asdict(self).items() if k in keep}}


class StrictModeError(JobFailed):
    pass


class OtherOptions(BadConfig, FileExistsError):
    """--out holds a shard set (or an unfinished job) built with other options."""


# ----------------------------------------------------------------------------------------- driver

def plan_shards(rows: list[dict], shard_size: int, limit: int | None) -> list[dict]:
    """Rows cut into shards per split, in listing order: the plan a resumed job must reproduce exactly."""
    plan = []
    for split in dict.fromkeys(r["split"] for r in rows):
        split_rows = [r for r in rows if r["split"] == split][:limit]
        for i in range(0, len(split_rows), shard_size):
            plan.append({"name": f"{split}-{i // shard_size:06d}.tar", "split": split,
                         "rows": split_rows[i:i + shard_size]})
    return plan


def prepare_text_encoder(cfg: JobConfig, out: Path) -> tuple[str, str]:
    """(spec the actors load, spec the manifest records). A random tower is created once, inside the set."""
    if cfg.text_encoder != RANDOM_TEXT_ENCODER:
        spec = absolute_spec(cfg.text_encoder)
        return spec, spec
    from pipeline.encoders import save_random_text_encoder

    folder = out / TEXT_ENCODER_DIR
    if not (folder / "open_clip_config.json").is_file():
        with atomic_path(folder) as tmp:
            save_random_text_encoder(tmp, seed=cfg.seed)
    return f"local-dir:{folder.resolve()}", f"local-dir:{TEXT_ENCODER_DIR}"


def choose_latent_scale(cfg: JobConfig, source, latent_format: str, std: float) -> tuple[float, str]:
    if cfg.latent_scale is not None:
        return cfg.latent_scale, "--latent-scale"
    if latent_format == "pixels":
        return 1.0, "pixels are already in [-1, 1]"
    if source.name == "coco" and cfg.image_encoder == DEFAULT_VAE:
        return PAPER_COCO_SCALE, "the paper's (U-ViT) value for SD-VAE latents of MS-COCO"
    if source.name == "uvit-features":  # moments of U-ViT's autoencoder_kl.pth, trained on at its scale
        return UVIT_LATENT_SCALE, "U-ViT's value for its MS-COCO features (configs/mscoco_uvit_small.py)"
    if is_ldm_vae_file(cfg.image_encoder):  # U-ViT's own autoencoder file: its networks expect its scale
        return UVIT_LATENT_SCALE, "U-ViT's value for its autoencoder file (configs/mscoco_uvit_small.py)"
    return 1.0 / std, "1 / measured std of the train latents"


def build_manifest(source, cfg: JobConfig, chash: str, plan: list[dict], sidecars: list[dict],
                   listing_skipped: list[dict], text_spec: str, inputs: int) -> dict:
    splits = {}
    for s in sidecars:
        info = splits.setdefault(s["split"], {"shards": [], "records": 0, "captions": 0})
        if s["records"]:  # an all-skipped shard is an empty tar: leave it out of the lists readers use
            info["shards"].append(s["name"])
        info["records"] += s["records"]
        info["captions"] += s["captions"]
    train = [s for s in sidecars if s["split"] == "train"] or sidecars
    total, total_sq, n = (sum(s["stats"][i] for s in train) for i in range(3))
    std = float(np.sqrt(max(total_sq / n - (total / n) ** 2, 0.0))) if n else float("nan")
    identities = next(s["identities"] for s in sidecars if s["records"])
    latent_shape = next(s["latent_shape"] for s in sidecars if s["records"])
    image = identities["image"]
    scale, why = choose_latent_scale(cfg, source, image["latent_format"], std)
    model_shape = [latent_shape[0] // 2, *latent_shape[1:]] if image["latent_format"] == "moments" else latent_shape
    skipped = listing_skipped + [entry for s in sidecars for entry in s["skipped"]]
    truncated = [entry for s in sidecars for entry in s["truncated"]]
    return {
        "format_version": FORMAT_VERSION,
        "name": Path(cfg.out).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": chash,
        "config": cfg.hashed(source),
        "source": source.options(),
        "splits": splits,
        "shards": {s["name"]: {k: s[k] for k in ("split", "records", "captions", "sha256", "bytes")}
                   for s in sidecars},
        "image_encoder": {**image, "dtype": "float16", "resolution": cfg.preprocess.resolution,
                          "latent_shape": latent_shape, "model_latent_shape": model_shape,
                          "latent_std": std, "latent_scale": scale, "latent_scale_source": why,
                          "preprocessing": cfg.preprocess.describe()},
        # A tower saved inside the set is named relative to it (both fields), so a moved or copied set,
        # and any two builds of the same set, record the same identity.
        "text_encoder": {**identities["text"], "spec": text_spec, "truncated_captions": len(truncated),
                         **({"model": text_spec} if text_spec == f"local-dir:{TEXT_ENCODER_DIR}" else {})},
        "null_text": NULL_TEXT,
        "counts": {"inputs": inputs, "records": sum(s["records"] for s in sidecars),
                   "captions": sum(s["captions"] for s in sidecars), "skipped": len(skipped),
                   "skipped_images": inputs - sum(s["records"] for s in sidecars),
                   "truncated_captions": len(truncated)},
        "skipped": skipped,
        "truncated_captions": truncated,
    }


def run(source, cfg: JobConfig) -> dict:
    """Build (or finish, or find up to date) the shard set `cfg.out`; return its manifest. The folder is
    locked for the whole job."""
    executor = choose_executor(cfg.executor, cfg.ray_address)  # a wrong choice fails before any work
    with FolderLock(cfg.out, f"python -m pipeline {source.name} --out {cfg.out}"):
        return _build(source, cfg, executor)


def _build(source, cfg: JobConfig, executor: str) -> dict:
    start = time.time()
    out = Path(cfg.out)
    chash = config_hash(cfg.hashed(source))
    if (manifest := finished_set(out, chash)) is not None:
        if cfg.strict and manifest["skipped"]:
            raise StrictModeError(f"--strict: {len(manifest['skipped'])} input(s) were skipped (see the manifest)")
        return manifest

    staging = prepare_staging(out, chash, cfg.hashed(source))
    rows, listing_skipped = source.rows()
    plan = plan_shards(rows, cfg.shard_size, cfg.limit)
    if not plan:
        raise BadConfig(f"the {source.name} source lists no images: check its paths and --limit")
    inputs = sum(len(s["rows"]) for s in plan)
    if cfg.strict and listing_skipped:
        raise StrictModeError(f"--strict: {len(listing_skipped)} input(s) rejected while listing, first: "
                              f"{listing_skipped[0]}")
    done = {s["name"] for s in plan if (staging / f"{s['name']}.json").is_file() and (out / s["name"]).is_file()}
    todo = [s for s in plan if s["name"] not in done]
    text_spec, manifest_text_spec = prepare_text_encoder(cfg, out)
    if done:
        print(f"resuming: {len(done)} of {len(plan)} shards already written, {len(todo)} to go")
    encode_start = time.time()
    if todo:
        (run_ray if executor == "ray" else run_local)(source, cfg, todo, out, text_spec)
    encode_seconds = time.time() - encode_start

    sidecars = [json.loads((staging / f"{s['name']}.json").read_text()) for s in plan]
    if not any(s["records"] for s in sidecars):
        raise JobFailed(f"every input was skipped; see the reasons in {staging}/*.json")
    manifest = build_manifest(source, cfg, chash, plan, sidecars, listing_skipped, manifest_text_spec, inputs)
    manifest["timing"] = {"executor": executor, "seconds": time.time() - start, "encode_seconds": encode_seconds,
                          "images_encoded": sum(len(s["rows"]) for s in todo),
                          "images_per_s": sum(len(s["rows"]) for s in todo) / max(encode_seconds, 1e-9)}
    if cfg.strict and manifest["skipped"]:
        print_summary(manifest)
        raise StrictModeError(f"--strict: {len(manifest['skipped'])} input(s) skipped (listed above); the shards "
                              f"are staged in {out}: fix the inputs, or run again without --strict to finish")
    finish_set(out, manifest)
    print_summary(manifest)
    return manifest


def finished_set(out: Path, chash: str) -> dict | None:
    """The manifest of the finished set in `out` when it was built with config `chash` (said so, with its
    summary), None when there is none yet; a set built with other options is refused."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = load_manifest(out)
    if manifest["config_hash"] != chash:
        raise OtherOptions(f"{out} already holds a shard set built with other options (config "
                           f"{manifest['config_hash']}, now {chash}): pass another --out, or delete {out}")
    shutil.rmtree(out / STAGING, ignore_errors=True)  # left only by a kill right after the manifest
    print(f"{out} is up to date (config {chash}): nothing to do")
    print_summary(manifest)
    return manifest


def prepare_staging(out: Path, chash: str, hashed_config: dict) -> Path:
    """The staging folder of a job with config hash `chash`: created, or an unfinished one of the same job
    resumed (another job's is refused), with the partial writes of a killed run removed."""
    staging = out / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    stamp = staging / "config.json"
    if stamp.is_file() and json.loads(stamp.read_text())["config_hash"] != chash:
        raise OtherOptions(f"{out} holds an unfinished job with other options: run that command again to "
                           f"finish it, or delete {out} to start over")
    atomic_write_json(stamp, {"config_hash": chash, "config": hashed_config})
    for stale in [p for folder in (out, staging) for p in folder.iterdir() if is_temporary(p)]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    return staging


def finish_set(out: Path, manifest: dict) -> None:
    """The manifest (last: its presence means the set is complete), then the data statistics derived from the
    finished shards (pipeline/statistics.py; not part of the config hash)."""
    from pipeline.reader import ShardSet
    from pipeline.statistics import compute_statistics, write_statistics

    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / STAGING)
    manifest["statistics"] = write_statistics(out, compute_statistics(ShardSet(out)))


def print_summary(manifest: dict) -> None:
    """One headline line (what the set holds), then the details, indented."""
    c, image, text = manifest["counts"], manifest["image_encoder"], manifest["text_encoder"]
    splits = " · ".join(f"{s} {info['records']:,}" for s, info in manifest["splits"].items())
    size = sum(s["bytes"] for s in manifest["shards"].values())
    reasons = Counter(e["reason"].split(":")[0] for e in manifest["skipped"])
    timing = manifest.get("timing")
    lines = [
        f"shard set {manifest['name']}: {c['records']:,} of {c['inputs']:,} images in {len(manifest['shards'])} "
        f"shards ({size / 1e9:.2f} GB), {c['skipped']} input(s) skipped"
        + (f", built in {timing['seconds']:.1f} s" if timing else ", up to date"),
        f"  splits     {splits}; {c['captions']:,} captions",
        f"  skipped    {c['skipped']} input(s)" + (": " + ", ".join(f"{r} {n}" for r, n in reasons.most_common())
                                                     if reasons else ""),
        f"  truncated  {c['truncated_captions']} caption(s) longer than {text['text_len']} tokens",
        f"  image      {image['spec']} -> {image['latent_format']} {image['latent_shape']} float16, "
        f"std {image['latent_std']:.4f}, scale {image['latent_scale']:.5f} ({image['latent_scale_source']})",
        f"  text       {text['spec']} -> [K, {text['text_len']}, {text['text_dim']}] float16",
        f"  config     {manifest['config_hash']}"
        + (f"; {timing['images_encoded']:,} images {timing.get('verb', 'encoded')} at "
           f"{timing['images_per_s']:.1f} images/s"
           + (f" ({timing['executor']} executor)" if "executor" in timing else "") if timing else ""),
    ]
    print("\n".join(lines), file=sys.stdout, flush=True)
