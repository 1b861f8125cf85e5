"""Evaluate a trained run: samples, FID, CLIP score, the shapes judge, a sample grid.

    python -m evaluate --run runs/if_concat                       # defaults by device (see --preset)
    python -m evaluate --run runs/if_concat --scales 0,0.5,1,2,3  # guidance sweep -> by_scale
    python -m evaluate --run runs/if_concat --checkpoints all     # training curve -> by_step
    torchrun --nproc_per_node=8 -m evaluate runs/if_xattn         # prompts split by rank, merged on rank 0
                                  # (the run as a positional: torchrun would take --run for its --run-path)

Writes RUN/eval/metrics.json, RUN/eval/samples/ (PNGs + index.jsonl with each image's prompt and seed) and
RUN/eval/grid.png, then prints a one-screen summary. An interrupted evaluation resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys

from evaluate.run import PRESETS, default_preset
from evaluate.sampler import DEFAULT_SOLVER, SOLVERS
from ifvit.cli import ArgumentParser, entry_point
from ifvit.files import CACHE_ENV, DEFAULT_CACHE


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.5,1,2,3, got {text!r}")


def parser() -> ArgumentParser:
    gpu, cpu = PRESETS["gpu"], PRESETS["cpu"]
    p = ArgumentParser(prog="python -m evaluate", description=__doc__.split("\n\n")[0], epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", metavar="RUN", help="the run directory, as --run (for torchrun)")
    p.add_argument("--run", help="run directory written by `python -m train`")
    p.add_argument("--preset", choices=list(PRESETS),
                   help=f"defaults to use (now: {default_preset()}): gpu = the paper's protocol; cpu = small "
                        "enough for the CPU demo")
    p.add_argument("--num-samples", type=int, help=f"distinct prompts (gpu {gpu.num_samples}, cpu {cpu.num_samples})")
    p.add_argument("--steps", type=int, help=f"model evaluations of the solver (gpu {gpu.steps}, cpu {cpu.steps})")
    p.add_argument("--solver", choices=SOLVERS, help=f"ODE solver (default {DEFAULT_SOLVER}): uvit = U-ViT's "
                                                   "DPM-Solver path (its published FIDs); dpmpp2m = diffusers' "
                                                   "multistep DPM-Solver++ (docs/sampling.md)")
    p.add_argument("--scale", type=float, help="guidance scale s, U-ViT convention eps_c + s(eps_c - eps_u); "
                                               "diffusers' guidance_scale = s + 1 (default 1)")
    p.add_argument("--scales", type=_floats, help="guidance sweep, e.g. 0,0.5,1,2,3 (fills by_scale)")
    p.add_argument("--checkpoints", help="latest (default) | all | STEP,STEP,... (fills by_step)")
    p.add_argument("--batch-size", type=int, help=f"prompts per sampler call (gpu {gpu.batch_size}, cpu "
                                                  f"{cpu.batch_size})")
    p.add_argument("--seed", type=int, help="selects prompts, captions and noise seeds (default 0)")
    p.add_argument("--split", choices=["val", "holdout"], help="prompt and FID reference split (default val)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, for offline machines")
    p.add_argument("--fid-features", metavar="NAME", help="feature extractor for FID: a torch-fidelity name "
                                                          "(default inception-v3-compat, the standard FID), "
                                                          "pytorch-fid (needs that package: U-ViT's FID path), or "
                                                          "none to skip FID")
    p.add_argument("--fid-ref", metavar="FILE.npz", help="FID reference statistics (mu, sigma: pytorch-fid's "
                                                         "format, e.g. U-ViT's fid_stats_mscoco256_val.npz) "
                                                         "instead of the split's own images")
    p.add_argument("--clip", metavar="SPEC", help="CLIP for the CLIP score: NAME:TAG, NAME:FILE, FILE, "
                                                  "local-dir:DIR, or none (default ViT-L-14-quickgelu:openai)")
    p.add_argument("--vae", metavar="SPEC", help="decode with this VAE instead of the shard set's (hub id, "
                                                 "diffusers folder, or an ldm FILE.pth such as U-ViT's "
                                                 "autoencoder_kl.pth); the set's latent scale is kept")
    p.add_argument("--shards", help="the run's shard set, if it has moved since training")
    p.add_argument("--cache-dir", metavar="DIR", help=f"where FID reference statistics are cached (default "
                                                      f"${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--compile", action="store_true", default=None, help="compile the model (GPU)")
    return p


@entry_point
def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.run is None) == (args.run_dir is None):
        p.error("name the run once: --run DIR (or DIR alone)")
    run_dir = args.run or args.run_dir
    from evaluate.report import summary
    from evaluate.run import config_from_args, evaluate_run

    options = {k: v for k, v in vars(args).items() if k not in ("run", "run_dir", "preset", "debug")}
    metrics = evaluate_run(run_dir, config_from_args(args.preset, **options))  # a bad --fid-ref stops it first
    if metrics is not None:  # rank 0
        print(summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
