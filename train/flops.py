"""Parameters and GFLOPs of every variant, in both conventions (the paper's Table 1).

    python -m train.flops [--json PATH]

Both conventions count 2 FLOPs per multiply-add for one forward pass at batch 1 (latent 4x32x32, 77x768 text):

- true:  every matmul, attention scores and values included -- torch.utils.flop_counter under the math
         attention backend (on CPU the fused SDPA kernel is silently counted as 0).
- paper: what ptflops counts on the authors' code -- module ops (Linear, Conv, LayerNorm, GELU, biases) but
         not the attention score/value matmuls. Computed as the true matmul count minus the attention bmm's,
         plus the elementwise module ops, which flop_counter does not count, from forward hooks.

Torch only, so it runs on a bare GPU machine too.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ifvit.cli import ArgumentParser, entry_point
from ifvit.files import atomic_write_json
from train.model import ABLATIONS, VARIANTS, ModelConfig, UViT, count_params

# Table 1 of the paper: params (M), GFLOPs, training iters/s on one RTX 4090.
PAPER_TABLE = {
    "early_concat": (45, 29.56, 1.81),
    "early_xattn": (45, 23.82, 2.54),
    "if_concat": (48, 25.84, 2.31),
    "if_xattn": (48, 23.66, 2.74),
}


def _example_inputs(cfg: ModelConfig, batch: int = 1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    context = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, context


@functools.lru_cache(maxsize=None)  # configs are frozen; tests and reports ask repeatedly
def _count(cfg: ModelConfig) -> tuple[int, int, int]:
    """(true FLOPs, attention bmm FLOPs, elementwise module FLOPs) of one batch-1 forward."""
    # The meta device keeps this cheap: the paper model's forward costs ~30 GFLOP we don't need to run.
    with torch.device("meta"):
        model = UViT(cfg).eval()
    x, t, context = (a.to("meta") for a in _example_inputs(cfg))

    elementwise = 0

    def hook(module, inputs, output):
        nonlocal elementwise
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            elementwise += output.numel()  # one add per output element
        elif isinstance(module, nn.LayerNorm):
            elementwise += 2 * inputs[0].numel()  # normalise + affine, as ptflops
        elif isinstance(module, nn.GELU):
            elementwise += inputs[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, t, context)
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    # Under the math backend attention is the only batched matmul: Linear layers lower to mm/addmm.
    attention = counter.get_flop_counts().get("Global", {}).get(torch.ops.aten.bmm, 0)
    return total, attention, 2 * elementwise


def true_flops(cfg: ModelConfig) -> int:
    """FLOPs of one forward pass at batch 1, every matmul counted (2 per multiply-add)."""
    return _count(cfg)[0]


def paper_flops(cfg: ModelConfig) -> int:
    """FLOPs of one forward pass at batch 1 in the paper's (ptflops) convention."""
    total, attention, elementwise = _count(cfg)
    return total - attention + elementwise


@dataclass
class Row:
    variant: str
    fusion: str
    conditioning: str
    n_text: int
    n_image: int
    params: int
    gflops_true: float
    gflops_paper: float
    paper_params_m: int | None
    paper_gflops: float | None
    paper_4090_its: float | None
    saving_true_pct: float = 0.0
    saving_paper_pct: float = 0.0


def table(include_ablations: bool = True) -> list[Row]:
    configs = {**VARIANTS, **(ABLATIONS if include_ablations else {})}
    rows = []
    for name, cfg in configs.items():
        total, attention, elementwise = _count(cfg)
        with torch.device("meta"):
            params = count_params(UViT(cfg))
        paper = PAPER_TABLE.get(name, (None, None, None))
        rows.append(Row(name, cfg.fusion, cfg.conditioning, cfg.n_text, cfg.n_image, params,
                        round(total / 1e9, 3), round((total - attention + elementwise) / 1e9, 3), *paper))
    base = next(r for r in rows if r.variant == "early_concat")
    for r in rows:
        r.saving_true_pct = round(100 * (1 - r.gflops_true / base.gflops_true), 1)
        r.saving_paper_pct = round(100 * (1 - r.gflops_paper / base.gflops_paper), 1)
    return rows


def format_table(rows: list[Row]) -> str:
    head = ("| variant | [n_text, n_image] | params | GFLOPs true | GFLOPs paper conv. | saving vs early_concat "
            "(true / paper) | paper: params / GFLOPs / 4090 it/s |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        paper = (f"{r.paper_params_m}M / {r.paper_gflops} / {r.paper_4090_its}" if r.paper_gflops else "–")
        lines.append(f"| {r.variant} | [{r.n_text}, {r.n_image}] | {r.params:,} | {r.gflops_true:.2f} | "
                     f"{r.gflops_paper:.2f} | {r.saving_true_pct:.1f}% / {r.saving_paper_pct:.1f}% | {paper} |")
    return "\n".join(lines)


@entry_point
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m train.flops", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    p.add_argument("--no-ablations", action="store_true", help="only the four main variants")
    p.add_argument("--markdown", action="store_true", help="print only the Markdown table (as in the README)")
    args = p.parse_args(argv)
    rows = table(include_ablations=not args.no_ablations)
    if args.markdown:
        print(format_table(rows))
        return 0
    print("U-ViT-S/2, one forward at batch 1 (latent 4x32x32, 77x768 text); 2 FLOPs per multiply-add.")
    print("true = every matmul incl. attention; paper conv. = module ops without attention matmuls (ptflops).\n")
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, [vars(r) for r in rows], indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
