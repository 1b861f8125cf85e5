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
import json
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evaluate.plotting import new_figure, save_figure, write_text
from train.model import ABLATIONS

# Training options that change neither the model nor what it learns: runs differing only in these (and the
# seed) are repeats of one experiment.
BOOKKEEPING = {"seed", "num_workers", "device", "compile", "log_every", "ckpt_every", "keep_checkpoints",
               "preview_every", "preview_prompts", "preview_steps", "preview_scale", "activation_checkpointing",
               "inject_nan_at_step", "precision"}


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    get: Callable[[dict], float | None]  # from Run.metrics (eval/metrics.json + the train_* speeds)
    better: str = ""  # "↑", "↓" or "" (no direction)
    digits: str = ".4g"


def _shapes(split: str, name: str) -> Callable[[dict], float | None]:
    def get(metrics: dict):
        shapes = metrics.get("shapes") or {}
        return (shapes.get(split) or {}).get(name)
    return get


def _clip(name: str) -> Callable[[dict], float | None]:
    return lambda m: (m.get("clip_score") or {}).get(name)


QUALITY = [
    Metric("fid", "FID", lambda m: m.get("fid"), "↓"),
    Metric("clip_s", "CLIP-S", _clip("clip_s"), "↑"),
    Metric("cos100", "100·cos", _clip("cos100"), "↑"),
    Metric("exact_accuracy", "exact scene", _shapes("val", "exact_accuracy"), "↑"),
    Metric("match_ratio", "count match (Eq. 10)", _shapes("val", "match_ratio"), "↑"),
    Metric("count_error", "count error (Eq. 9)", _shapes("val", "count_error"), "↓"),
    Metric("color_accuracy", "colour", _shapes("val", "color_accuracy"), "↑"),
    Metric("shape_accuracy", "shape", _shapes("val", "shape_accuracy"), "↑"),
    Metric("relation_accuracy", "relation", _shapes("val", "relation_accuracy"), "↑"),
    Metric("holdout_exact_accuracy", "hold-out exact", _shapes("holdout", "exact_accuracy"), "↑"),
    Metric("holdout_match_ratio", "hold-out count match", _shapes("holdout", "match_ratio"), "↑"),
]
COST = [
    Metric("params", "params", lambda m: m.get("params"), digits=",d"),
    Metric("gflops_true", "GFLOPs (true)", lambda m: m.get("gflops_true"), "↓"),
    Metric("gflops_paper", "GFLOPs (paper conv.)", lambda m: m.get("gflops_paper"), "↓"),
    Metric("train_steps_per_s", "train steps/s", lambda m: m.get("train_steps_per_s"), "↑"),
    Metric("train_mfu", "train MFU", lambda m: m.get("train_mfu"), "↑", digits=".1%"),
    Metric("sampling_images_per_s", "sampling img/s", lambda m: (m.get("sampling") or {}).get("images_per_s"), "↑"),
]
MAIN = ("fid", "clip_s", "cos100", "exact_accuracy", "match_ratio", "count_error", "train_steps_per_s",
        "train_mfu")
ABLATION_BARS = ("fid", "clip_s", "exact_accuracy", "match_ratio", "count_error", "gflops_true", "gflops_paper",
                 "train_steps_per_s")


def pick(*keys: str) -> list[Metric]:
    table = {m.key: m for m in QUALITY + COST}
    return [table[k] for k in keys]


# Curves: keys of by_scale / by_step rows, with their titles.
CURVE_TITLES = {"fid": "FID", "clip_s": "CLIP-S", "cos100": "100·cos", "shapes_exact": "exact scene",
                "shapes_match_ratio": "count match (Eq. 10)", "shapes_count_error": "count error (Eq. 9)"}


def fmt(value, digits: str = ".4g") -> str:
    if value is None:
        return "–"
    if digits.endswith("d"):  # counts: a mean over seeds of equal counts comes back as a float
        value = round(value)
    return format(value, digits)


# -- reading runs ---------------------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    label: str
    config: dict
    metrics: dict  # eval/metrics.json, plus the training speed of metrics.jsonl (train_*)
    train_log: list[dict] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return self.config.get("variant") or self.metrics.get("variant") or "?"

    @property
    def seed(self):
        return self.config.get("train", {}).get("seed")


def read_train_log(path: Path) -> tuple[list[dict], list[str]]:
    """metrics.jsonl rows; a cut or garbled line is skipped and reported."""
    rows, problems = [], []
    if not path.is_file():
        return rows, [f"{path}: missing (no training speed or loss curve)"]
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            problems.append(f"{path}:{i}: not JSON, skipped")
    return rows, problems


def training_speed(rows: list[dict]) -> dict:
    """Median steps/s and MFU over the logged windows, the first left out when there are others: it
    includes data-loader start-up and compilation, not the steady state."""
    steady = rows[1:] if len(rows) > 1 else rows

    def median(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"train_steps_per_s": median("steps_per_s"), "train_samples_per_s": median("samples_per_s"),
            "train_mfu": median("mfu")}


def read_run(path: str | Path) -> tuple[Run | None, list[str]]:
    """(Run, problems) or (None, [why it is left out])."""
    path = Path(path)
    metrics_file = path / "eval" / "metrics.json"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, [f"{path}: no readable config.json ({e.__class__.__name__}): not a run directory?"]
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, [f"{path}: no readable eval/metrics.json ({e.__class__.__name__}): evaluate it first "
                      f"(python -m evaluate --run {path})"]
    rows, problems = read_train_log(path / "metrics.jsonl")
    metrics = {**metrics, **training_speed(rows)}
    if metrics.get("params") is None or metrics.get("gflops_true") is None:
        metrics.update(model_cost(config))
    return Run(path, path.name, config, metrics, rows), problems


def model_cost(config: dict) -> dict:
    """Parameters and GFLOPs from the run's model config, for metrics.json files without them."""
    import torch

    from train.flops import paper_flops, true_flops
    from train.model import ModelConfig, UViT, count_params

    cfg = ModelConfig(**config["model"])
    with torch.device("meta"):
        params = count_params(UViT(cfg))
    return {"params": params, "gflops_true": true_flops(cfg) / 1e9, "gflops_paper": paper_flops(cfg) / 1e9}


def unique_labels(runs: list[Run]) -> None:
    """Folder names, with the parent folder where two runs share one."""
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"


# -- grouping over seeds --------------------------------------------------------------------------------

def experiment_key(run: Run) -> str:
    """What must agree for runs to be repeats: variant, model, data, training recipe and evaluation
    protocol -- everything but the seed and bookkeeping."""
    train = {k: v for k, v in run.config.get("train", {}).items() if k not in BOOKKEEPING}
    m = run.metrics
    protocol = {k: m.get(k) for k in ("step", "num_samples", "steps", "scale", "seed", "split", "fid_reference",
                                      "fid_features")}
    protocol["solver"] = m.get("solver", "dpmpp2m")  # evaluations before the choice used diffusers' solver
    return json.dumps([run.variant, run.config.get("model"), str(run.config.get("shards")), train, protocol],
                      sort_keys=True, default=str)


@dataclass
class Group:
    label: str
    variant: str
    runs: list[Run]

    def values(self, metric: Metric) -> list[float]:
        return [v for r in self.runs if (v := metric.get(r.metrics)) is not None]

    def stats(self, metric: Metric) -> dict | None:
        """mean, sample std (n - 1; 0 for one run) and n over the runs that have the metric."""
        values = self.values(metric)
        if not values:
            return None
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)}


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        key = experiment_key(run)
        if key not in groups:
            groups[key] = Group(run.variant, run.variant, [])
        groups[key].runs.append(run)
    # Two different experiments of one variant (other steps, another preset...): name them apart.
    result = list(groups.values())
    for group in result:
        same = [g for g in result if g.variant == group.variant]
        if len(same) > 1:
            group.label = f"{group.variant} ({group.runs[0].label})"
    return result


def mean_std(stats: dict | None, digits: str) -> str:
    if stats is None:
        return "–"
    if stats["n"] == 1:
        return fmt(stats["mean"], digits)
    return f"{fmt(stats['mean'], digits)} ± {fmt(stats['std'], digits)} (n={stats['n']})"


# -- plots ----------------------------------------------------------------------------------------------

def _load_png(path: Path, min_side: int = 96):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        image = np.asarray(im.convert("RGB"))
    factor = max(1, -(-min_side // image.shape[0]))  # small shapes renders stay crisp: nearest-neighbour
    return image.repeat(factor, 0).repeat(factor, 1)


def common_samples(runs: list[Run], n: int) -> tuple[list[dict], dict[str, dict[tuple, Path]]]:
    """The first `n` (prompt, seed) pairs every run has sampled, and each run's file of each pair."""
    files = {}
    for run in runs:
        index = run.path / "eval" / "samples" / "index.jsonl"
        entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()] \
            if index.is_file() else []
        files[run.label] = {(e["prompt"], e["seed"]): run.path / "eval" / "samples" / e["file"] for e in entries}
    first = runs[0].label
    shared = [pair for pair in files[first] if all(pair in files[r.label] for r in runs)]
    return [{"prompt": p, "seed": s} for p, s in shared[:n]], files


def plot_samples(runs: list[Run], pairs: list[dict], files: dict, path: Path) -> None:
    """Fig. 4: one row per run, one column per (prompt, seed), the prompt above its column."""
    cols = len(pairs)
    fig = new_figure(1.5 * cols + 1.2, 1.55 * len(runs) + 0.9)
    axes = fig.subplots(len(runs), cols, squeeze=False)
    for row, run in zip(axes, runs):
        for ax, pair in zip(row, pairs):
            ax.imshow(_load_png(files[run.label][pair["prompt"], pair["seed"]]), interpolation="nearest")
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


def ablation_groups(groups: list[Group]) -> list[Group]:
    """Groups of one conditioning that has ablation runs: early fusion, [1, n_image], [0, n_image], [1, 0]
    (Fig. 7); empty when no ablation run is present."""
    out = []
    for cond in ("concat", "xattn"):
        family = [f"early_{cond}", f"if_{cond}", *[a for a in ABLATIONS if a.startswith(f"if_{cond}_")]]
        members = [g for name in family for g in groups if g.variant == name]
        if any(g.variant in ABLATIONS for g in members):
            out += members
    return out


def fusion_deltas(groups: list[Group]) -> list[dict]:
    """For each conditioning with both fusions present: intermediate minus early, per metric, with the
    standard error of that difference over seeds (sqrt(s1²/n1 + s2²/n2); None with one run on a side)."""
    out = []
    for cond in ("concat", "xattn"):
        early = next((g for g in groups if g.variant == f"early_{cond}"), None)
        inter = next((g for g in groups if g.variant == f"if_{cond}"), None)
        if early is None or inter is None:
            continue
        for metric in QUALITY + [m for m in COST if m.key != "params"]:
            a, b = inter.stats(metric), early.stats(metric)
            if a is None or b is None:
                continue
            se = (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5 if min(a["n"], b["n"]) > 1 else None
            out.append({"conditioning": cond, "metric": metric.key, "title": metric.title, "better": metric.better,
                        "early": b["mean"], "intermediate": a["mean"], "delta": a["mean"] - b["mean"],
                        "delta_se": se, "n": (b["n"], a["n"]),
                        "step": (early.runs[0].metrics.get("step"), inter.runs[0].metrics.get("step"))})
    return out


# -- the report -----------------------------------------------------------------------------------------

def run_numbers(run: Run) -> dict:
    return {m.key: m.get(run.metrics) for m in COST + QUALITY}


def build_report(run_dirs: list[str | Path], out: Path, grid_prompts: int = 8) -> dict:
    """Read the runs, write report.md, report.json and the plots into `out`; returns report.json's dict."""
    problems, runs = [], []
    for path in run_dirs:
        run, found = read_run(path)
        problems += found
        if run is not None:
            runs.append(run)
    if not runs:
        raise SystemExit("no run could be read:\n  " + "\n  ".join(problems))
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
    write_text(out / "report.json", json.dumps(report, indent=1))
    write_text(out / "report.md", markdown(runs, groups, report))
    return report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _present(metrics: list[Metric], runs: list[Run]) -> list[Metric]:
    return [m for m in metrics if any(m.get(r.metrics) is not None for r in runs)]


def _split(model: dict) -> str:
    if model.get("fusion") != "intermediate":
        return "early"
    return f"[{model.get('n_text')}, {model.get('n_image')}]"


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories, each evaluated by python -m evaluate")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts (columns) in the sample grid")
    args = p.parse_args(argv)
    report = build_report(args.runs, args.out, args.grid_prompts)
    print_summary(report, args.out)


if __name__ == "__main__":
    main()
