"""The runs `python -m evaluate.compare` puts side by side: what is measured, how runs are read, and which
runs are repeats of one experiment (grouped over seeds). The report itself is evaluate/compare.py.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evaluate.sample_folder import INDEX, read_index
from ifvit.errors import UserError
from train.model import ABLATIONS
from train.run_dir import RunDir

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

    @property
    def dir(self) -> RunDir:
        return RunDir(self.path, self.config)


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
    try:
        run = RunDir.open(path)
        metrics = run.read_eval_metrics()
    except (UserError, OSError, json.JSONDecodeError) as e:
        return None, [f"{path}: left out: {e}"]
    problems = [] if run.metrics_path.is_file() else [f"{run.metrics_path}: missing (no training speed or loss "
                                                      "curve)"]
    rows = run.read_metrics(problems)
    metrics = {**metrics, **training_speed(rows)}
    if metrics.get("params") is None or metrics.get("gflops_true") is None:
        metrics.update(model_cost(run.config))
    return Run(run.path, run.name, run.config, metrics, rows), problems


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


def common_samples(runs: list[Run], n: int) -> tuple[list[dict], dict[str, dict[tuple, Path]]]:
    """The first `n` (prompt, seed) pairs every run has sampled, and each run's file of each pair."""
    files = {}
    for run in runs:
        folder = run.dir.samples_dir
        entries = read_index(folder) if (folder / INDEX).is_file() else []
        files[run.label] = {(e["prompt"], e["seed"]): folder / e["file"] for e in entries}
    first = runs[0].label
    shared = [pair for pair in files[first] if all(pair in files[r.label] for r in runs)]
    return [{"prompt": p, "seed": s} for p, s in shared[:n]], files


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


def run_numbers(run: Run) -> dict:
    return {m.key: m.get(run.metrics) for m in COST + QUALITY}
