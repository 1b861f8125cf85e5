"""Text to image from free text with a trained run.

    python -m evaluate.sample --run runs/if_concat --prompt "two red circles" --num 8 --scale 3

The prompt is encoded by the shard set's own text encoder (for `shapes`, the random tower saved inside the
set), sampled with the EMA weights as in `python -m evaluate` (image i uses seed --seed + i), decoded by the
shard set's image codec, and written as PNGs plus a grid. On a `shapes` run a prompt in the generator's
grammar is also read back by the judge, so you see at once whether each image matches it.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from evaluate.images import save_grid, save_png
from evaluate.sampler import DEFAULT_SOLVER, SOLVERS
from ifvit.cli import ArgumentParser, entry_point
from ifvit.files import atomic_write_json
from ifvit.lock import FolderLock


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m evaluate.sample", description=__doc__.split("\n\n")[0],
                       epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by `python -m train`")
    p.add_argument("--prompt", required=True, action="append", help="text prompt (repeat for several)")
    p.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale s, U-ViT convention (default 3, "
                                                            "the paper's figures; diffusers' guidance_scale s+1)")
    p.add_argument("--steps", type=int, default=50, help="model evaluations of the solver (default 50)")
    p.add_argument("--solver", choices=SOLVERS, default=DEFAULT_SOLVER,
                   help=f"ODE solver (default {DEFAULT_SOLVER}, U-ViT's path; dpmpp2m: diffusers' multistep)")
    p.add_argument("--seed", type=int, default=0, help="image i of each prompt uses seed + i (default 0)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--vae", metavar="SPEC", help="decode with this VAE instead of the shard set's (e.g. U-ViT's "
                                                 "autoencoder_kl.pth); the set's latent scale is kept")
    p.add_argument("--shards", help="the run's shard set, if it has moved since training")
    p.add_argument("--out", help="output folder (default RUN/text_samples)")
    return p


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "prompt"


@entry_point
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from evaluate import judge
    from evaluate.sampler import sample
    from pipeline.shapes import parse_caption
    from train.run_dir import RunDir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = RunDir.open(args.run, shards=args.shards)
    shard_set = run.shard_set()
    model = run.load_model(args.step, ema=True, device=device)
    encoder, codec = shard_set.text_encoder(device), shard_set.image_codec(device, vae=args.vae)
    null_text = shard_set.null_text().to(device)
    out = Path(args.out) if args.out else run.path / "text_samples"
    seeds = list(range(args.seed, args.seed + args.num))

    with FolderLock(out, "python -m evaluate.sample"):
        for prompt in args.prompt:
            context = encoder([prompt]).to(device).expand(args.num, -1, -1)
            images = codec.decode(sample(model, context, null_text, steps=args.steps, scale=args.scale,
                                         seeds=seeds, solver=args.solver, **run.sampling())).cpu()
            paths = [out / f"{slug(prompt)}_seed{s}.png" for s in seeds]
            for image, path in zip(images, paths):
                save_png(image, path)
            save_grid(images, out / f"{slug(prompt)}_grid.png")
            print(f"{prompt!r}: {len(paths)} images in {out}/ ({paths[0].name} ... ; grid {slug(prompt)}_grid.png), "
                  f"scale {args.scale:g}, {args.steps} {args.solver} steps, seeds {seeds[0]}..{seeds[-1]}")

            if not shard_set.is_shapes:
                continue
            target = parse_caption(prompt)
            if target is None:
                print("  judge: not read -- the prompt is outside the shapes caption grammar "
                      "(e.g. 'two red circles and a blue square', 'a red circle left of a blue square')")
            else:
                results = [judge.score(judge.read_scene(im.permute(1, 2, 0).numpy()), target) for im in images]
                marks = " ".join("ok" if r["exact"] else "x" for r in results)
                counts = "; ".join(", ".join(f"{g['counted']}/{g['requested']} {g['color']} {g['shape']}"
                                             for g in r["groups"]) for r in results)
                print(f"  judge: exact scene {marks}   counted/requested: {counts}")
                atomic_write_json(out / f"{slug(prompt)}_judge.json", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
