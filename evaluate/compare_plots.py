"""The figures of `python -m evaluate.compare` (the report and what each figure shows: evaluate/compare.py).

Each `plot_*` draws one PNG from the runs (or groups of runs over seeds) and returns the panels it drew, so
the report lists exactly what is there; a figure with nothing to show is not written.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from evaluate.images import enlarge, load_png
from evaluate.plotting import new_figure, save_figure

if TYPE_CHECKING:
    from evaluate.compare import Group, Metric, Run

# Curves: keys of by_scale / by_step rows, with their titles.
CURVE_TITLES = {"fid": "FID", "clip_s": "CLIP-S", "cos100": "100·cos", "shapes_exact": "exact scene",
                "shapes_match_ratio": "count match (Eq. 10)", "shapes_count_error": "count error (Eq. 9)"}


def plot_samples(runs: list[Run], pairs: list[dict], files: dict, path: Path) -> None:
    """Fig. 4: one row per run, one column per (prompt, seed), the prompt above its column."""
    cols = len(pairs)
    fig = new_figure(1.5 * cols + 1.2, 1.55 * len(runs) + 0.9)
    axes = fig.subplots(len(runs), cols, squeeze=False)
    for row, run in zip(axes, runs):
        for ax, pair in zip(row, pairs):
            image = enlarge(load_png(files[run.label][pair["prompt"], pair["seed"]]), min_side=96)
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
        row[0].set_ylabel(run.label, fontsize=7)
    for ax, pair in zip(axes[0], pairs):
        ax.set_title("\n".join(textwrap.wrap(pair["prompt"], 22)[:3]), fontsize=6)
    save_figure(fig, path)


def _curve_keys(rows_by_run: dict[str, list[dict]], skip: set[str]) -> list[str]:
    keys = []
    for rows in rows_by_run.values():
        for row in rows:
            for k, v in row.items():
                if k not in skip and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.append(k)
    return keys


def plot_guidance(runs: list[Run], path: Path) -> list[str]:
    """Fig. 3 right: FID against CLIP-S ("trade-off"), one line per run, points marked with their scale;
    then every other swept metric against the scale. Returns the panels drawn (none: no run has a sweep)."""
    sweeps = {r.label: sorted(r.metrics.get("by_scale") or [], key=lambda row: row["scale"]) for r in runs}
    sweeps = {k: v for k, v in sweeps.items() if v}
    if not sweeps:
        return []
    keys = [k for k in _curve_keys(sweeps, {"scale", "guidance_scale", "step", "num_samples"})
            if any(row.get(k) is not None for rows in sweeps.values() for row in rows)]
    trade_off = "fid" in keys and "clip_s" in keys
    panels = (["trade-off"] if trade_off else []) + keys
    if not panels:
        return []
    fig = new_figure(4.2 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for label, rows in sweeps.items():
            if panel == "trade-off":
                pts = [(row["clip_s"], row["fid"], row["scale"]) for row in rows
                       if row.get("clip_s") is not None and row.get("fid") is not None]
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                for x, y, s in pts:
                    ax.annotate(f"{s:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points",
                                color=line.get_color())
                ax.set(xlabel="CLIP-S", ylabel="FID", title="FID against CLIP score over guidance scales")
            else:
                pts = [(row["scale"], row[panel]) for row in rows if row.get(panel) is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set(xlabel="guidance scale s (U-ViT convention)", title=CURVE_TITLES.get(panel, panel))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
    return panels


def plot_training(runs: list[Run], path: Path) -> list[str]:
    """Fig. 3 left/middle: training loss (metrics.jsonl) and every by_step metric against the step.
    Returns the panels drawn."""
    curves = {r.label: sorted(r.metrics.get("by_step") or [], key=lambda row: row["step"]) for r in runs}
    curves = {k: v for k, v in curves.items() if v}
    keys = [k for k in _curve_keys(curves, {"step", "scale", "num_samples"})
            if any(row.get(k) is not None for rows in curves.values() for row in rows)]
    losses = {r.label: [(row["step"], row["loss"]) for row in r.train_log if row.get("loss") is not None]
              for r in runs}
    panels = (["loss"] if any(losses.values()) else []) + keys
    if not panels:
        return []
    fig = new_figure(4.2 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        for run in runs:
            if panel == "loss":
                pts = losses[run.label]
            else:
                pts = [(row["step"], row[panel]) for row in curves.get(run.label, []) if row.get(panel) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if panel == "loss" else "o",
                        label=run.label)
        ax.set(xlabel="training step", title="training loss (ε-MSE)" if panel == "loss"
               else CURVE_TITLES.get(panel, panel))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
    return panels


def plot_bars(groups: list[Group], metrics: list[Metric], path: Path, title: str) -> list[str]:
    """One panel per metric, one bar per group, error bars = std over seeds, each run's value a dot.
    Returns the metrics drawn."""
    metrics = [m for m in metrics if any(g.stats(m) for g in groups)]
    if not metrics:
        return []
    fig = new_figure(max(3.0, 0.9 * len(groups) + 1.2) * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        xs = range(len(groups))
        stats = [g.stats(metric) for g in groups]
        ax.bar(xs, [s["mean"] if s else 0 for s in stats], yerr=[s["std"] if s else 0 for s in stats],
               color="tab:blue", alpha=0.7, capsize=3)
        for x, group in zip(xs, groups):
            values = group.values(metric)
            ax.plot([x] * len(values), values, "k.", markersize=4)
        ax.set_xticks(list(xs), [g.label for g in groups], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric.title} {metric.better}".strip(), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
    return [m.key for m in metrics]
