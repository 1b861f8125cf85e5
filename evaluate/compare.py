"""Runs side by side: one Markdown report with plots (the paper's Table 1 and Figs. 3, 4, 5, 7).

    python -m evaluate.compare RUN... --out DIR [--grid-prompts 8]

Reads each run's config.json, metrics.jsonl (training log) and eval/metrics.json (`python -m evaluate`), and
writes DIR/report.md, DIR/report.json (every number in the report) and the plots beside them:

- cost: parameters, GFLOPs in both conventions, training steps/s and MFU (median of the logged windows after
  the first, which includes start-up and compilation), sampling images/s;
- quality and alignment: FID, CLIP score, and on `shapes` the judge's exact-scene, count (Eq. 9, 10),
  colour, shape and relation accuracies, also on the hold-out split of unseen colour-shape pairs;
  runs that differ only in their training seed form one group, reported as mean ± std over seeds;
- samples.png: the same prompts and seeds for every run, one row per run (Fig. 4);
- guidance.png: FID against CLIP score over the guidance sweep, several runs on one plot (Fig. 3 right),
  from `python -m evaluate --scales ...`; with no FID or CLIP score, the metrics against the scale;
- training.png: training loss and every evaluated metric against the step (Fig. 3 left/middle), the
  latter from `python -m evaluate --checkpoints all`;
- count_error.png: count error and match ratio against the requested count (Fig. 5), on `shapes`;
- metrics.png: the main metrics per group with their spread over seeds; ablations.png when ablation
  runs ([n_text, n_image] = [0, 4], [1, 0]) are present (Fig. 7).

A run that cannot be read (not evaluated yet, a broken file) is left out and listed with the reason.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from evaluate.compare_plots import plot_bars, plot_guidance, plot_samples, plot_training
from evaluate.compare_runs import (ABLATION_BARS, COST, MAIN, QUALITY, Group, Metric, Run, ablation_groups,
                                   common_samples, fmt, fusion_deltas, group_runs, mean_std, pick, read_run,
                                   run_numbers, unique_labels)
from ifvit.cli import ArgumentParser, entry_point
from ifvit.errors import UserError
from ifvit.files import atomic_write_json, atomic_write_text
from ifvit.lock import FolderLock
from train.diagnostic import BUCKETS, bucket_bounds

# -- the report -----------------------------------------------------------------------------------------

def build_report(run_dirs: list[str | Path], out: Path, grid_prompts: int = 8) -> dict:
    """Read the runs, write report.md, report.json and the plots into `out`; returns report.json's dict."""
    problems, runs = [], []
    for path in run_dirs:
        run, found = read_run(path)
        problems += found
        if run is not None:
            runs.append(run)
    if not runs:
        raise UserError("no run could be read: " + "; ".join(problems))
    unique_labels(runs)
    groups = group_runs(runs)
    out.mkdir(parents=True, exist_ok=True)

    plots: dict[str, dict] = {}  # name -> {"file", "panels"}: what each figure shows, for report.json

    def drawn(name: str, panels: list[str]) -> None:
        if panels:
            plots[name] = {"file": f"{name}.png", "panels": panels}

    pairs, files = common_samples(runs, grid_prompts)
    if pairs:
        plot_samples(runs, pairs, files, out / "samples.png")
        drawn("samples", [r.label for r in runs])
    else:
        problems.append("no (prompt, seed) sampled by every run: evaluate all runs with the same --seed and "
                        "shard set for a side-by-side sample grid")
    drawn("guidance", plot_guidance(runs, out / "guidance.png"))
    drawn("training", plot_training(runs, out / "training.png"))
    shapes_runs = {r.label: r.metrics["shapes"]["val"] for r in runs if (r.metrics.get("shapes") or {}).get("val")}
    if shapes_runs:
        from evaluate.judge import plot_count_error

        plot_count_error(shapes_runs, out / "count_error.png", title="Count alignment on shapes (val)")
        drawn("count_error", list(shapes_runs))
    drawn("metrics", plot_bars(groups, pick(*MAIN), out / "metrics.png",
                               "Main metrics (bars: mean over seeds, error bars: std, dots: runs)"))
    ablations = ablation_groups(groups)
    if ablations:
        drawn("ablations", plot_bars(ablations, pick(*ABLATION_BARS), out / "ablations.png",
                                     "Ablations of intermediate fusion: [n_text, n_image]"))

    report = {
        "runs": [{"label": r.label, "path": str(r.path), "variant": r.variant, "seed": r.seed,
                  "step": r.metrics.get("step"), **run_numbers(r)} for r in runs],
        "groups": [{"label": g.label, "variant": g.variant, "runs": [r.label for r in g.runs],
                    **{m.key: g.stats(m) for m in COST + QUALITY}} for g in groups],
        "fusion_deltas": fusion_deltas(groups), "samples": pairs, "plots": plots, "problems": problems,
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(runs, groups, report))
    return report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _present(metrics: list[Metric], runs: list[Run]) -> list[Metric]:
    return [m for m in metrics if any(m.get(r.metrics) is not None for r in runs)]


def _split(model: dict) -> str:
    if model.get("fusion") != "intermediate":
        return "early"
    return f"[{model.get('n_text')}, {model.get('n_image')}]"


def last_diagnostic(train_log: list[dict]) -> dict | None:
    """The newest metrics.jsonl row carrying the training diagnostic (train/diagnostic.py), or None."""
    return next((row for row in reversed(train_log) if row.get("x0_mse_by_t")), None)


def markdown(runs: list[Run], groups: list[Group], report: dict) -> str:
    first = runs[0].metrics
    lines = ["# Comparison of runs", "",
             f"{len(runs)} runs in {len(groups)} groups (runs differing only in the training seed are one "
             "group: mean ± sample std over seeds, n = runs). Evaluation: "
             f"{first.get('num_samples')} samples, {first.get('steps')} steps of the "
             f"{first.get('solver', 'dpmpp2m')} solver, guidance scale "
             f"{first.get('scale')} (U-ViT convention; diffusers guidance_scale {first.get('guidance_scale')}).",
             ""]
    if first.get("preset_note"):
        lines += [f"Note: {first['preset_note']}.", ""]
    lines += ["## Runs", ""]
    lines += _table(["run", "variant", "[n_text, n_image]", "seed", "step", "eval samples", "FID skipped",
                     "CLIP skipped"],
                    [[r.label, r.variant, _split(r.config.get("model") or {}), str(r.seed), str(r.metrics.get("step")),
                      str(r.metrics.get("num_samples")), r.metrics.get("fid_skipped", "") and "yes",
                      r.metrics.get("clip_skipped", "") and "yes"] for r in runs])
    skipped = sorted({r.metrics[k] for r in runs for k in ("fid_skipped", "clip_skipped") if r.metrics.get(k)})
    if skipped:
        lines += ["", "Skipped metrics, and how to enable them:"] + [f"- {s}" for s in skipped]

    cost, quality = _present(COST, runs), _present(QUALITY, runs)
    lines += ["", "## Cost", "",
              "GFLOPs of one forward pass at batch 1, 2 FLOPs per multiply-add: *true* counts every matmul "
              "including attention; *paper conv.* counts module ops without the attention matmuls (ptflops, "
              "the paper's Table 1). Training speed: median over logged windows on the run's own hardware.", ""]
    lines += _table(["group", *[f"{m.title} {m.better}".strip() for m in cost]],
                    [[g.label, *[mean_std(g.stats(m), m.digits) for m in cost]] for g in groups])
    lines += ["", "## Quality and alignment", ""]
    if quality:
        lines += _table(["group", *[f"{m.title} {m.better}".strip() for m in quality]],
                        [[g.label, *[mean_std(g.stats(m), m.digits) for m in quality]] for g in groups])
        lines += ["", "Per run:", ""]
        lines += _table(["run", *[m.title for m in quality]],
                        [[r.label, *[fmt(m.get(r.metrics), m.digits) for m in quality]] for r in runs])
    else:
        lines += ["No quality metric was computed (see the skipped metrics above)."]

    diagnosed = [(r, diag) for r in runs if (diag := last_diagnostic(r.train_log))]
    if diagnosed:
        lines += ["", "## Error by noise level (training diagnostic)", "",
                  "x0 MSE of the EMA model's prediction on a fixed val batch per bucket of t, at its last "
                  "preview, against predicting the mean training image (lower is better; above the mean image "
                  "means samples cannot follow captions at that noise level), and how much the caption moves "
                  "the prediction (docs/training.md, \"The diagnostic\").", ""]
        buckets = [f"t {bucket_bounds(b)[0]}+" for b in range(BUCKETS)]
        lines += _table(["run", "step", "figure", *buckets],
                        [[r.label, str(diag["step"]), name, *[f"{v:.3f}" for v in diag[key]]]
                         for r, diag in diagnosed
                         for name, key in (("x0 MSE", "x0_mse_by_t"), ("mean image", "baseline_by_t"),
                                           ("caption effect", "caption_effect_by_t"))])

    if report["fusion_deltas"]:
        lines += ["", "## Intermediate against early fusion", "",
                  "Intermediate minus early fusion of the same conditioning, each at its evaluated training step "
                  "(equal steps make it the paper's comparison); ± is the standard error of the difference over "
                  "seeds (shown with at least two seeds a side). The arrow says which sign is better.", ""]
        lines += _table(["conditioning", "metric", "early", "intermediate", "difference", "seeds (early, inter.)",
                         "step (early, inter.)"],
                        [[d["conditioning"], f"{d['title']} {d['better']}".strip(), fmt(d["early"]),
                          fmt(d["intermediate"]),
                          fmt(d["delta"], "+.4g") + (f" ± {fmt(d['delta_se'])}" if d["delta_se"] is not None else ""),
                          f"{d['n'][0]}, {d['n'][1]}", f"{d['step'][0]}, {d['step'][1]}"]
                         for d in report["fusion_deltas"]])

    plots = report["plots"]
    sections = [
        ("samples", "Samples: same prompts and seeds for every run (Fig. 4)",
         "One row per run, one column per prompt; the initial noise of each column is the same in every row, "
         "so differences come from the model alone."),
        ("guidance", "Guidance sweep (Fig. 3 right)",
         "Each point is one guidance scale (labelled). Lower-right is better on the FID-CLIP trade-off: more "
         "guidance raises CLIP score until quality (FID) breaks down; the elbow is the scale to sample with."),
        ("training", "Training curves (Fig. 3 left, middle)",
         "Loss and every evaluated checkpoint against the step; a variant that reaches a metric in fewer "
         "steps trains more efficiently."),
        ("count_error", "Count alignment (Fig. 5)",
         "Average count error (Eq. 9, lower is better) and match ratio (Eq. 10) against the requested "
         "count, judged automatically on shapes."),
        ("metrics", "Main metrics with their spread over seeds",
         "Bars are group means, error bars one sample std, dots the individual runs: a difference smaller "
         "than the spread is not a difference."),
        ("ablations", "Ablations (Fig. 7)",
         "[n_text, n_image]: [0, n] fuses only in the middle (image-only skips), [1, 0] adds a text block "
         "but fuses from the start; the paper finds the first drives FID, the second CLIP score."),
    ]
    for key, title, how in sections:
        if key in plots:
            lines += ["", f"## {title}", "", how, "", f"![{title}]({plots[key]['file']})"]
    if report["samples"]:
        lines += ["", "Prompts of the sample grid, left to right:", ""]
        lines += [f"{i}. {p['prompt']} (seed {p['seed']})" for i, p in enumerate(report["samples"], 1)]
    if report["problems"]:
        lines += ["", "## Left out", ""] + [f"- {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def print_summary(report: dict, out: Path) -> None:
    keys = [m for m in ("fid", "clip_s", "exact_accuracy", "match_ratio", "count_error", "train_steps_per_s")
            if any(g[m] for g in report["groups"])]
    print(f"\n{'group':<28}" + "".join(f"{k:>22}" for k in keys))
    for g in report["groups"]:
        cells = [g[k] and (f"{g[k]['mean']:.4g} ± {g[k]['std']:.2g}" if g[k]["n"] > 1 else f"{g[k]['mean']:.4g}")
                 for k in keys]
        print(f"{g['label']:<28}" + "".join(f"{c or '–':>22}" for c in cells))
    for p in report["problems"]:
        print(f"left out: {p}")
    print(f"\nreport: {out / 'report.md'} ({len(report['plots'])} plots: {', '.join(report['plots'])})")


@entry_point
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m evaluate.compare", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, each evaluated by python -m evaluate")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts (columns) in the sample grid")
    args = p.parse_args(argv)
    with FolderLock(args.out, "python -m evaluate.compare"):
        report = build_report(args.runs, args.out, args.grid_prompts)
    print_summary(report, args.out)
    return 0


if __name__ == "__main__":
    main()
