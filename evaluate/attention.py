"""Where does the text go? Attention of image queries over text keys at every fused block (paper Fig. 8).

    python -m evaluate.attention --run DIR [--run DIR2 ...] [--num-prompts N] [--out DIR] [--no-border]

Samples N validation prompts with the run's EMA weights and records, at every fused block and every sampling
step, the probabilities of each patch query over the text keys -- the conditional half of the guidance
batch only (the sampler's `attention_callback`, docs/CONTRACTS.md §5). Two summaries per block:

- the average map: each patch query's attention mass on the text (its probabilities summed over the text
  keys), averaged over prompts, heads and steps and laid out on the latent grid;
- the top-10 singular values of the [patches x text] attention matrix. The spectrum is computed for every
  prompt, head and step separately and only then averaged: averaging maps first would smear different
  prompts' patterns together and measure the rank of the blur, not of the attention.

`--no-border` drops the outermost ring of latent patches from both summaries, as the paper does: SD-VAE
latents of padded convolutions draw attention to the border that says nothing about the prompt.
Writes attention.json (every number) and attention_maps.png, attention_spectra.png, and with several runs
attention_compare.png (early against intermediate fusion) to --out (default RUN/eval/attention).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from evaluate.plotting import new_figure, save_figure
from evaluate.sampler import DEFAULT_SOLVER, SOLVERS
from ifvit.cli import ArgumentParser, entry_point
from ifvit.errors import BadConfig
from ifvit.files import atomic_write_json
from ifvit.lock import FolderLock

TOP_K = 10


def drop_border(probs: torch.Tensor, grid: int) -> torch.Tensor:
    """[..., grid*grid, T] -> [..., (grid-2)**2, T]: the patch rows off the latent border."""
    if grid < 3:
        raise ValueError(f"a {grid}x{grid} latent grid has no interior: run without --no-border")
    rows = probs.unflatten(-2, (grid, grid))[..., 1:-1, 1:-1, :]
    return rows.flatten(-3, -2)


def top_singular_values(probs: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """[..., L, T] -> [..., k]: the k largest singular values of each matrix (zeros past its rank bound)."""
    sv = torch.linalg.svdvals(probs.double())  # descending; double so tiny values are not noise
    if sv.shape[-1] < k:
        sv = torch.nn.functional.pad(sv, (0, k - sv.shape[-1]))
    return sv[..., :k]


class AttentionStats:
    """Running sums over prompts, heads and sampling steps, one set per fused block.

    Called as the sampler's `attention_callback(step_index, t, {block: [B, heads, L, T]})`. `batch` is the
    number of prompts in the current sampling call: a callback with any other batch size (e.g. the
    conditional and unconditional halves together, 2B) is refused rather than silently averaged in.
    """

    def __init__(self, grid: int, remove_border: bool = False, k: int = TOP_K):
        self.grid, self.remove_border, self.k = grid, remove_border, k
        self.batch: int | None = None
        self.map_sum: dict[str, torch.Tensor] = {}
        self.sv_sum: dict[str, torch.Tensor] = {}
        self.sv_sq_sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.steps = 0

    @property
    def side(self) -> int:
        return self.grid - 2 if self.remove_border else self.grid

    def __call__(self, step_index: int, t, attention: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for block, probs in attention.items():
            B, heads, L, _ = probs.shape
            if self.batch is not None and B != self.batch:
                raise RuntimeError(f"block {block}: attention for {B} images, expected {self.batch}: the "
                                   "callback must get the conditional half of the guidance batch only")
            if L != self.grid * self.grid:
                raise RuntimeError(f"block {block}: {L} patch queries do not form the {self.grid}^2 grid")
            probs = probs.detach().float().cpu()
            if self.remove_border:
                probs = drop_border(probs, self.grid)
            mass = probs.sum(-1).sum((0, 1))  # [L']: attention mass on the text, summed over images/heads
            sv = top_singular_values(probs, self.k)  # [B, heads, k]: one spectrum per image and head
            if block not in self.count:
                self.map_sum[block] = torch.zeros_like(mass, dtype=torch.float64)
                self.sv_sum[block] = torch.zeros(self.k, dtype=torch.float64)
                self.sv_sq_sum[block] = torch.zeros(self.k, dtype=torch.float64)
                self.count[block] = 0
            self.map_sum[block] += mass.double()
            self.sv_sum[block] += sv.sum((0, 1))
            self.sv_sq_sum[block] += (sv**2).sum((0, 1))
            self.count[block] += B * heads

    def summary(self) -> dict[str, dict]:
        """{block: {"map": side x side list, "text_mass", "singular_values", "singular_values_std", "matrices"}}."""
        out = {}
        for block, n in self.count.items():
            avg_map = (self.map_sum[block] / n).view(self.side, self.side)
            mean = self.sv_sum[block] / n
            std = (self.sv_sq_sum[block] / n - mean**2).clamp_min(0).sqrt()
            out[block] = {
                "map": avg_map.tolist(),
                "text_mass": avg_map.mean().item(),
                "singular_values": mean.tolist(),
                "singular_values_std": std.tolist(),
                "matrices": n,  # images x heads x steps that went into the averages
            }
        return out


# -- sampling a run -------------------------------------------------------------------------------------

def analyse_run(run_dir: str | Path, *, num_prompts: int = 8, steps: int = 50, scale: float = 3.0,
                seed: int = 0, batch_size: int = 8, remove_border: bool = False,
                device: str = "cpu", solver: str = DEFAULT_SOLVER, shards: str | None = None) -> dict:
    """Sample `num_prompts` val prompts with the run's EMA model and summarise its text attention.
    `shards` replaces the run's recorded shard set (--shards)."""
    from evaluate.prompts import choose_prompts
    from evaluate.sampler import sample
    from train.run_dir import RunDir

    run = RunDir.open(run_dir, shards=shards)
    model = run.load_model(device=device)
    shards = run.shard_set()
    prompts, problems = choose_prompts(shards, "val", num_prompts, seed=seed)
    for problem in problems:
        print(f"left out: {problem}")
    null = shards.null_text().to(device)
    cfg = model.cfg
    grid = cfg.img_size // cfg.patch_size
    stats = AttentionStats(grid, remove_border=remove_border)

    from tqdm import tqdm
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"attention {Path(run_dir).name}", unit="batch"):
        chunk = prompts[start:start + batch_size]
        context = torch.from_numpy(np.stack([p.text for p in chunk])).float().to(device)
        stats.batch = len(chunk)
        sample(model, context, null, steps=steps, scale=scale, seeds=[p.seed for p in chunk],
               latent_shape=(cfg.in_chans, cfg.img_size, cfg.img_size), attention_callback=stats, solver=solver,
               **run.sampling())

    blocks = stats.summary()
    return {
        "run": str(run_dir),
        "label": Path(run_dir).name,
        "variant": run.variant,
        "fusion": cfg.fusion,
        "conditioning": cfg.conditioning,
        "block_names": model.block_names(),
        "fused_blocks": model.fused_block_names(),
        "grid": grid,
        "border_removed": remove_border,
        "num_prompts": len(prompts),
        "steps": steps,
        "solver": solver,
        "scale": scale,
        "prompts": [{"prompt": p.prompt, "seed": p.seed, "key": p.key} for p in prompts],
        "blocks": blocks,
    }


# -- plots ----------------------------------------------------------------------------------------------

def _label(result: dict) -> str:
    return f"{result['label']} ({result['fusion']}, {result['conditioning']})"


def plot_maps(results: list[dict], path: Path) -> None:
    """Rows: runs; columns: the U's blocks in forward order (blank where a block sees no text).

    Each map is scaled to its own range so its *shape* (focused or uniform) reads at a glance; the title
    gives its mean attention mass on the text, which is comparable across blocks and runs.
    """
    names = results[0]["block_names"]
    fig = new_figure(1.4 * len(names), 1.7 * len(results) + 0.4)
    axes = fig.subplots(len(results), len(names), squeeze=False)
    for row, res in zip(axes, results):
        for ax, name in zip(row, names):
            ax.set_xticks([]), ax.set_yticks([])
            block = res["blocks"].get(name)
            if block is None:
                ax.set_title(f"{name}\nno text", fontsize=7, color="grey")
                ax.axis("off")
                continue
            ax.imshow(block["map"], cmap="viridis")
            ax.set_title(f"{name}\nmass {block['text_mass']:.3f}", fontsize=7)
        row[0].set_ylabel(res["label"], fontsize=8)
        row[0].axis("on"), row[0].set_xticks([]), row[0].set_yticks([])
    border = " (latent border removed)" if results[0]["border_removed"] else ""
    fig.suptitle(f"Average attention of image patches on the text, per block{border}", fontsize=10)
    save_figure(fig, path)


def plot_spectra(results: list[dict], path: Path) -> None:
    """Rows: runs; columns: fused blocks; bars: mean top-10 singular values (one shared y axis)."""
    names = results[0]["block_names"]
    fig = new_figure(1.4 * len(names), 1.6 * len(results) + 0.4)
    axes = fig.subplots(len(results), len(names), squeeze=False, sharey=True)
    for row, res in zip(axes, results):
        for ax, name in zip(row, names):
            ax.set_xticks([])
            block = res["blocks"].get(name)
            if block is None:
                ax.set_title(f"{name}\nno text", fontsize=7, color="grey")
                continue
            ks = range(1, len(block["singular_values"]) + 1)
            ax.bar(ks, block["singular_values"], yerr=block["singular_values_std"], color="tab:blue",
                   error_kw={"elinewidth": 0.5})
            ax.set_title(name, fontsize=7)
        row[0].set_ylabel(res["label"], fontsize=7)
    fig.suptitle("Top-10 singular values of patch-to-text attention (mean ± std over images, heads, steps)",
                 fontsize=10)
    save_figure(fig, path)


def plot_compare(results: list[dict], path: Path) -> None:
    """One line per run across the U's blocks: leading singular value, top-10 sum, and text mass."""
    names = results[0]["block_names"]
    panels = [("σ1 (largest singular value)", lambda b: b["singular_values"][0]),
              ("sum of top-10 singular values", lambda b: sum(b["singular_values"])),
              ("mean attention mass on text", lambda b: b["text_mass"])]
    fig = new_figure(5 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels))
    for ax, (title, value) in zip(axes, panels):
        for res in results:
            xs = [i for i, n in enumerate(names) if n in res["blocks"]]
            ax.plot(xs, [value(res["blocks"][names[i]]) for i in xs], marker="o",
                    linestyle="-" if res["fusion"] == "intermediate" else "--", label=_label(res))
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Early (dashed) against intermediate (solid) fusion, per block", fontsize=10)
    save_figure(fig, path)


def write_outputs(results: list[dict], out: Path) -> dict[str, Path]:
    """attention.json plus the plots; returns {name: path} of everything written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "attention.json", "maps": out / "attention_maps.png",
             "spectra": out / "attention_spectra.png"}
    atomic_write_json(paths["json"], {"runs": results})
    plot_maps(results, paths["maps"])
    plot_spectra(results, paths["spectra"])
    if len(results) > 1:
        paths["compare"] = out / "attention_compare.png"
        plot_compare(results, paths["compare"])
    return paths


def print_summary(results: list[dict], paths: dict[str, Path]) -> None:
    for res in results:
        print(f"\n{_label(res)}: {res['num_prompts']} prompts x {res['steps']} steps, scale {res['scale']}"
              f"{', border removed' if res['border_removed'] else ''}")
        print(f"  {'block':>6} {'text mass':>10} {'σ1':>8} {'Σ top-10':>9}")
        for name in res["block_names"]:
            b = res["blocks"].get(name)
            if b is not None:
                print(f"  {name:>6} {b['text_mass']:10.4f} {b['singular_values'][0]:8.4f} "
                      f"{sum(b['singular_values']):9.4f}")
    print()
    for name, path in paths.items():
        print(f"{name:>8}: {path}")


@entry_point
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m evaluate.attention", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", action="append", required=True, metavar="DIR",
                   help="a run directory; repeat to compare runs (e.g. early against intermediate fusion)")
    p.add_argument("--num-prompts", type=int, default=8, help="val prompts to sample (default 8)")
    p.add_argument("--steps", type=int, default=50, help="model evaluations per image (default 50)")
    p.add_argument("--solver", choices=SOLVERS, default=DEFAULT_SOLVER, help="ODE solver (evaluate.sampler)")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale, U-ViT convention (paper figures: 3)")
    p.add_argument("--seed", type=int, default=0, help="prompt choice and per-image noise seeds")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-border", action="store_true", help="drop the latent border ring, as the paper does")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="output folder (default: RUN/eval/attention for one run)")
    p.add_argument("--shards", help="the shard set (prompts and text encodings), if it has moved since training")
    args = p.parse_args(argv)
    if args.out is None:
        if len(args.run) > 1:
            p.error("several runs: pass --out DIR for the shared plots")
        args.out = Path(args.run[0]) / "eval" / "attention"

    with FolderLock(args.out, "python -m evaluate.attention"):
        results = [analyse_run(run, num_prompts=args.num_prompts, steps=args.steps, scale=args.scale,
                               seed=args.seed, batch_size=args.batch_size, remove_border=args.no_border,
                               device=args.device, solver=args.solver, shards=args.shards) for run in args.run]
        names = {tuple(r["block_names"]) for r in results}
        if len(names) > 1:
            raise BadConfig("runs have U's of different depths: compare runs of one model size")
        print_summary(results, write_outputs(results, args.out))
    return 0


if __name__ == "__main__":
    main()
