"""Train one variant on one shard set.

    python -m train --variant if_concat --shards shards/shapes --out runs/if_concat
    torchrun --nproc_per_node=8 -m train --variant if_xattn --shards shards/coco256 --out runs/if_xattn

Re-running with an existing --out resumes from its latest checkpoint (with the run's saved configuration;
flags given again override it, e.g. --steps to train longer). Every TrainConfig field is a flag:
--lr 1e-4, --ema-decay 0.999, --grad-accum 4, --activation-checkpointing true, --compile false, ...
"""
from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import fields

from ifvit.cli import ArgumentParser, entry_point
from train.config import PRESETS, TrainConfig, field_types, parse_overrides
from train.model import ABLATIONS, VARIANTS


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0], epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", required=True, metavar="NAME",
                   help=f"{', '.join([*VARIANTS, *ABLATIONS])}, or any split as if_concat_t1i2 "
                        "(if_{concat|xattn}_t{n_text}i{n_image})")
    p.add_argument("--shards", required=True, help="shard set folder written by `python -m pipeline`")
    p.add_argument("--out", required=True, help="run directory; an existing one is resumed")
    p.add_argument("--preset", choices=list(PRESETS),
                   help="default: coco for VAE shard sets; for pixel sets shapes on a GPU, tiny on a CPU")
    p.add_argument("--n-text", type=int, help="text-only blocks (intermediate fusion; default: the variant's)")
    p.add_argument("--n-image", type=int, help="image-only blocks per side (default: the variant's, scaled "
                                               "to the preset's depth)")
    options = p.add_argument_group("training options (TrainConfig fields; default: the preset's)")
    types = field_types()
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        kind = next(t for t in (*typing.get_args(types[f.name]), types[f.name]) if t is not type(None))
        by_preset = " · ".join(f"{name} {getattr(preset, f.name)}" for name, preset in PRESETS.items())
        options.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", metavar=kind.__name__.upper(),
                             help=f"({by_preset})")
    return p


@entry_point
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    raw = {k.removeprefix("cfg_"): v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    overrides = parse_overrides(raw)  # a value of the wrong type is a BadConfig naming the option

    from train.distributed import shutdown
    from train.trainer import train

    try:
        train(args.variant, args.shards, args.out, preset=args.preset, overrides=overrides,
              n_text=args.n_text, n_image=args.n_image)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
