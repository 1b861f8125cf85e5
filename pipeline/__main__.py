"""python -m pipeline shapes|coco|table|uvit-features|stats|verify|bench ...  (docs/pipeline.md)"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ifvit.cli import ArgumentParser, entry_point
from ifvit.errors import BadConfig, MissingPath
from ifvit.lock import FolderLock
from pipeline.encoders import DEFAULT_CLIP, DEFAULT_VAE
from pipeline.executors import EXECUTORS, absolute_spec
from pipeline.job import RANDOM_TEXT_ENCODER, JobConfig, run
from pipeline.shapes import WORLDS
from pipeline.sources import CocoSource, Preprocess, ShapesSource, TableSource


def add_job_options(p: argparse.ArgumentParser, out: str | None, resolution: int, encoders: bool = True) -> None:
    p.add_argument("--out", default=out, required=out is None, help="shard set folder" +
                   (f" (default {out})" if out else ""))
    p.add_argument("--resolution", type=int, default=resolution, help=f"square side in pixels (default {resolution})")
    if encoders:
        p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL hub id or local folder")
        p.add_argument("--clip", default=DEFAULT_CLIP,
                       help=f"open_clip NAME:TAG, NAME:FILE, a checkpoint FILE, local-dir:DIR, or "
                            f"'{RANDOM_TEXT_ENCODER}' (a seeded random tower saved in the set)")
        p.add_argument("--min-side", type=int, default=Preprocess.min_side,
                       help="skip images whose shorter side is smaller (pixels)")
        p.add_argument("--max-aspect", type=float, default=Preprocess.max_aspect,
                       help="skip images more elongated than this (long side / short side)")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.add_argument("--limit", type=int, help="encode only the first N images of each split")
    p.add_argument("--latent-scale", type=float, help="override the latent scale recorded in the manifest")
    p.add_argument("--batch-size", type=int, default=64, help="encoder batch size (images or captions)")
    p.add_argument("--executor", choices=EXECUTORS, default="auto",
                   help="ray: Ray Data (clusters, multi-node); local: this process + a pool of CPU workers, no Ray "
                        "needed; auto (default): ray where it is installed, else local")
    p.add_argument("--workers", type=int, help="the local executor's load/write processes (default: every core)")
    p.add_argument("--ray-address", help="join a running Ray cluster (e.g. auto or HEAD:6379): the multi-node path; "
                                         "--out and the inputs must be on storage every node sees")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) if any input is skipped")


def job_config(args, image_encoder: str, text_encoder: str, seed: int = 0) -> JobConfig:
    # shapes has no --min-side: its images are exactly --resolution on a side
    min_side = min(getattr(args, "min_side", args.resolution), args.resolution)
    pre = Preprocess(resolution=args.resolution, min_side=min_side,
                     max_aspect=getattr(args, "max_aspect", Preprocess.max_aspect))
    return JobConfig(out=args.out, image_encoder=image_encoder, text_encoder=text_encoder, preprocess=pre,
                     shard_size=args.shard_size, limit=args.limit, latent_scale=args.latent_scale, seed=seed,
                     batch_size=args.batch_size, executor=args.executor, workers=args.workers,
                     ray_address=args.ray_address, strict=args.strict)


def uvit_features(args) -> int:
    from pipeline.uvit_features import ANNOTATION_FILES, UViTFeatureSource, run as run_uvit

    files = {"train": args.captions_train, "val": args.captions_val}
    if args.annotations:
        if any(files.values()):
            raise BadConfig("pass either --annotations DIR or --captions-train/--captions-val, not both")
        files = {s: str(Path(args.annotations) / name) for s, name in ANNOTATION_FILES.items()}
    if any(files.values()) and not all(files.values()):
        raise BadConfig("pass both --captions-train and --captions-val (U-ViT extracted both splits), or neither")
    source = UViTFeatureSource(args.root, files if all(files.values()) else None, args.resolution)
    cfg = JobConfig(out=args.out, image_encoder=absolute_spec(args.vae), text_encoder=absolute_spec(args.clip),
                    preprocess=Preprocess(resolution=args.resolution), shard_size=args.shard_size, limit=args.limit,
                    latent_scale=args.latent_scale, strict=args.strict)
    run_uvit(source, cfg, workers=args.workers or os.cpu_count())
    return 0


@entry_point
def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("shapes", help="the embedded synthetic set: pixels + a seeded random CLIP text tower")
    add_job_options(p, "shards/shapes", 32, encoders=False)
    p.add_argument("--train-images", type=int, default=ShapesSource.train_images)
    p.add_argument("--val-images", type=int, default=ShapesSource.val_images)
    p.add_argument("--holdout-images", type=int, default=ShapesSource.holdout_images)
    p.add_argument("--seed", type=int, default=0, help="scene generator and text tower seed")
    p.add_argument("--clip", default=RANDOM_TEXT_ENCODER, help="text encoder spec (default: a random tower)")
    p.add_argument("--world", default="full", choices=sorted(WORLDS),
                   help="the generator's world (docs/shapes.md): full, or demo (3 colours, one group of 1-3 large objects)")

    p = sub.add_parser("coco", help="MS-COCO captions 2014/2017 -> SD-VAE moments + CLIP text states")
    add_job_options(p, "shards/coco256", 256)
    p.add_argument("--coco-root", required=True, help="folder with annotations/ and train2014/ val2014/ (or 2017)")
    p.add_argument("--year", type=int, default=2014, choices=(2014, 2017))

    p = sub.add_parser("table", help="your own images: a parquet/JSONL/CSV table of image paths and captions")
    add_job_options(p, None, 256)
    p.add_argument("--table", required=True, help=".parquet, .jsonl, .json, .csv or .tsv")
    p.add_argument("--image-root", required=True, help="folder the table's image paths are relative to")
    p.add_argument("--image-column", help="image path column (default: image, image_path, path, file, ...)")
    p.add_argument("--caption-column", action="append", default=[],
                   help="caption column; repeat for several; a column may hold a list (default: caption*, text)")
    p.add_argument("--id-column", help="id column (default: id if present); duplicate ids are skipped")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of images for val without a split column")

    p = sub.add_parser("stats", help="compute a finished set's data statistics (statistics.npz; nothing re-encoded)")
    p.add_argument("path")

    p = sub.add_parser("uvit-features", help="U-ViT's extracted MS-COCO features (train/ val/ empty_context.npy) "
                                             "as a shard set, without re-encoding")
    p.add_argument("--root", required=True, help="U-ViT's feature folder, e.g. assets/datasets/coco256_features")
    p.add_argument("--out", required=True, help="shard set folder")
    p.add_argument("--vae", default=DEFAULT_VAE, help="the VAE that decodes the moments, recorded in the manifest "
                                                      "(U-ViT's: its assets/stable-diffusion/autoencoder_kl.pth)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="the text encoder recorded for new prompts (default: the "
                                                        "one that gives U-ViT's states)")
    p.add_argument("--annotations", help="folder with COCO 2014's captions_train2014.json and captions_val2014.json "
                                         "(caption texts; without them, no CLIP score)")
    p.add_argument("--captions-train", help="captions_train2014.json (instead of --annotations)")
    p.add_argument("--captions-val", help="captions_val2014.json (instead of --annotations)")
    p.add_argument("--resolution", type=int, default=256, help="the features' image side (256: moments [8, 32, 32])")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.add_argument("--limit", type=int, help="only the first N images of each split")
    p.add_argument("--latent-scale", type=float, help="override the latent scale (default U-ViT's 0.23010)")
    p.add_argument("--workers", type=int, help="reader processes (default: every core)")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) if any input is skipped")

    p = sub.add_parser("verify", help="check a shard set's checksums, counts and readability (exit 1 on a fault)")
    p.add_argument("path")

    p = sub.add_parser("bench", help="encoder throughput (real SD-VAE / ViT-L-14 architectures) and loader speed")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--shards", help="measure the loader on this shard set (default: a synthetic COCO-shaped one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="fewer iterations (CPU smoke run)")

    args = parser.parse_args(argv)
    if args.command == "verify":
        from pipeline.verify import verify

        if not Path(args.path).is_dir():
            raise MissingPath(f"no folder {args.path}: pass the shard set to check (e.g. shards/shapes)")
        return 0 if verify(args.path) else 1
    if args.command == "stats":
        from pipeline.reader import ShardSet
        from pipeline.statistics import compute_statistics, write_statistics

        if not Path(args.path).is_dir():
            raise MissingPath(f"no folder {args.path}: pass the shard set (e.g. shards/shapes)")
        shard_set = ShardSet(args.path)
        with FolderLock(args.path, f"python -m pipeline stats {args.path}"):
            summary = write_statistics(args.path, compute_statistics(shard_set))
        print(f"{args.path}: statistics of {summary['records']} train records -> {summary['file']}; image mean "
              f"{summary['image_mean']}, std {summary['image_std']}; text std {summary['text_std_range']}")
        return 0
    if args.command == "bench":
        from pipeline.bench import main as bench_main

        if args.shards and not Path(args.shards).is_dir():
            raise MissingPath(f"no shard set at {args.shards}: pass --shards DIR of a finished set, or leave it out "
                              "for a synthetic COCO-shaped one")

        bench_main(args)
        return 0

    if args.command == "uvit-features":
        return uvit_features(args)
    if args.command == "shapes":
        source = ShapesSource(args.train_images, args.val_images, args.holdout_images, args.seed, args.resolution,
                             args.world)
        cfg = job_config(args, "pixels", args.clip, seed=args.seed)
    elif args.command == "coco":
        source = CocoSource(args.coco_root, args.year)
        cfg = job_config(args, args.vae, args.clip)
    else:
        source = TableSource(args.table, args.image_root, args.image_column, tuple(args.caption_column),
                             args.id_column, args.val_fraction)
        cfg = job_config(args, args.vae, args.clip)
    run(source, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
