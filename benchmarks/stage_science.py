"""Stage 5: does a GPU-sized model learn the `shapes` world, and does intermediate fusion help? Judged.

    shards    `python -m pipeline shapes --executor local`: the default shapes set, built on this machine
    train     early_concat, then if_concat, each `python -m train --preset shapes` (whatever that preset is
              today) stopped with SIGTERM (the trainer checkpoints and exits) the same number of seconds
              after its first log line, so both train for equal wall time after compiling
    judge     `evaluate.run.evaluate_run` on val and hold-out prompts (the same prompts and seeds for both),
              the shapes judge reading every sample: count match, count error, colour, shape, relation, exact
    figures   science-grids.png (both grids side by side), science-count-error.png, science-loss.png
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.campaign import ROOT, Recorder, StageContext

VARIANTS = ("early_concat", "if_concat")
JUDGED = ("exact_accuracy", "match_ratio", "count_error", "color_accuracy", "shape_accuracy", "relation_accuracy",
          "num_images")
# GPU: 500 val + 500 hold-out prompts (the hold-out split's size), DPM-Solver++ at evaluate's default steps.
# startup_s: launch to the first log line, eager (compiling adds COMPILE_S).
FULL = dict(log_every=20, startup_s=20, eval_s=20, min_train_s=10, num_samples=500)
COMPILE_S = 45
# Compiling the shapes model costs ~COMPILE_S and speeds its steps up by well under 2x: it pays only when
# each training gets minutes (a larger --budget), not for the default campaign's shorter ones.
COMPILE_FROM_S = 150
# --smoke: a few seconds each, toy model (sizes only: the recipe stays the preset's).
SMOKE = dict(log_every=1, startup_s=8, eval_s=6, min_train_s=1, num_samples=4, train_s=1)
SMOKE_SHARDS = ["--train-images", "64", "--val-images", "8", "--holdout-images", "8", "--shard-size", "32"]
SMOKE_TRAIN = ["--width", "32", "--depth", "5", "--heads", "2", "--patch-size", "4", "--batch-size", "8",
               "--num-workers", "0"]


def build_shards(out: Path, smoke: bool) -> dict:
    from pipeline.__main__ import main as pipeline
    from pipeline.manifest import load_manifest

    start = time.monotonic()
    code = pipeline(["shapes", "--out", str(out), "--executor", "local", *(SMOKE_SHARDS if smoke else [])])
    if code:
        raise RuntimeError(f"python -m pipeline shapes exited {code}")
    m = load_manifest(out)
    return {"records": m["counts"]["records"], "splits": {s: v["records"] for s, v in m["splits"].items()},
            "seconds": time.monotonic() - start, "build": m.get("timing"), "source": m["source"]}


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_for(variant: str, shards: Path, run: Path, seconds: float, sizes: dict, smoke: bool,
              deadline: float, compile_model: bool) -> dict:
    """Train until `seconds` after the first log line (or `deadline`), then SIGTERM: the trainer checkpoints."""
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, never a resumed one
    run.mkdir(parents=True)
    cmd = [sys.executable, "-m", "train", "--variant", variant, "--shards", str(shards), "--out", str(run),
           "--preset", "shapes", "--preview-every", "0", "--log-every", str(sizes["log_every"]),
           "--compile", str(compile_model).lower(), *(SMOKE_TRAIN if smoke else [])]
    launched = time.monotonic()
    with open(run.parent / f"{variant}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        first_seen = None
        while proc.poll() is None and time.monotonic() < deadline:
            if first_seen is None and read_metrics(run):
                first_seen = time.monotonic()
            if first_seen is not None and time.monotonic() >= first_seen + seconds:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # checkpoint at the next log step, then exit 0
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    records = read_metrics(run)
    if proc.returncode != 0 or not records or not (run / "checkpoints" / "latest.pt").is_file():
        tail = (run.parent / f"{variant}.log").read_text()[-1500:]
        raise RuntimeError(f"training {variant} ended with exit code {proc.returncode} after "
                           f"{len(records)} log lines:\n{tail}")
    first, last = records[0], records[-1]
    window = last["elapsed_s"] - first["elapsed_s"]
    config = json.loads((run / "config.json").read_text())
    return {"steps": last["step"], "train_s": window, "until_first_log_s": first["elapsed_s"],
            "wall_s": time.monotonic() - launched, "steps_per_s": (last["step"] - first["step"]) / window
            if window > 0 else None, "samples_per_s": last.get("samples_per_s"), "mfu": last.get("mfu"),
            "loss_first": first["loss"], "loss_last": last["loss"], "preset": config["train"]["preset"],
            "batch_size": config["train"]["batch_size"], "recipe": config["train"], "model": config["model"],
            "curve": [[r["elapsed_s"] - first["elapsed_s"], r["loss"]] for r in records]}


def judge(run: Path, sizes: dict, smoke: bool) -> dict:
    from evaluate.run import config_from_args, evaluate_run

    cuda = torch.cuda.is_available() and not smoke
    options = dict(num_samples=sizes["num_samples"], clip="none", fid_features="none")
    if smoke:
        options.update(steps=2, batch_size=4)
    metrics = evaluate_run(run, config_from_args("gpu" if cuda else "cpu", **options))
    shapes = metrics.get("shapes") or {}
    return {"step": metrics["step"], "steps": metrics["steps"], "scale": metrics["scale"],
            "sampling_images_per_s": metrics["sampling"]["images_per_s"], "grid": metrics["grid"],
            **{split: {k: agg.get(k) for k in JUDGED} | {"by_count": agg.get("by_count")}
               for split, agg in shapes.items() if agg}}


def run(rec: Recorder, ctx: StageContext) -> None:
    sizes = SMOKE if ctx.smoke else FULL
    shards, runs = ctx.work / "shards" / "shapes", ctx.work / "runs"
    with rec.item("shards") as out:
        out.update(build_shards(shards, ctx.smoke))
    if rec.data["items"]["shards"]["status"] != "ok":
        raise RuntimeError("no shapes shard set: nothing to train")

    cuda = torch.cuda.is_available() and not ctx.smoke
    reserve = len(VARIANTS) * (sizes["eval_s"] + sizes["startup_s"]) + 5
    seconds = sizes.get("train_s") or max((ctx.remaining() - reserve) / len(VARIANTS), sizes["min_train_s"])
    compile_model = cuda and seconds - COMPILE_S >= COMPILE_FROM_S
    if compile_model:
        seconds -= COMPILE_S
    rec.set("train_seconds_each", seconds)
    rec.set("compiled", compile_model)
    for variant in VARIANTS:
        with rec.item(f"train_{variant}") as out:
            startup = sizes["startup_s"] + (COMPILE_S if compile_model else 0)
            deadline = time.monotonic() + seconds + 2 * startup
            out.update(train_for(variant, shards, runs / variant, seconds, sizes, ctx.smoke, deadline,
                                 compile_model))
    for variant in VARIANTS:
        if rec.data["items"][f"train_{variant}"]["status"] == "ok":
            with rec.item(f"judge_{variant}") as out:
                out.update(judge(runs / variant, sizes, ctx.smoke))
    with rec.item("figures") as out:
        out["files"] = figures(rec.data["items"], ctx.figures)


def figures(items: dict, folder: Path) -> list[str]:
    """The two sample grids side by side, the count-error plot and the loss curves, as PNGs in `folder`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from evaluate.judge import plot_count_error

    judged = {v: items[f"judge_{v}"] for v in VARIANTS if items.get(f"judge_{v}", {}).get("status") == "ok"}
    written = []
    if judged:
        fig = Figure(figsize=(8 * len(judged), 8.6), layout="constrained")
        FigureCanvasAgg(fig)
        for axis, (variant, j) in zip(fig.subplots(1, len(judged), squeeze=False)[0], judged.items()):
            axis.imshow(Image.open(j["grid"]))
            val = j.get("val") or {}
            axis.set_title(f"{variant} (step {j['step']}): count match {val.get('match_ratio', 0):.0%}, "
                           f"exact {val.get('exact_accuracy', 0):.0%}")
            axis.axis("off")
        fig.savefig(folder / "science-grids.png", dpi=100)
        written.append("science-grids.png")
        vals = {v: j["val"] for v, j in judged.items() if j.get("val")}
        if vals and all(v.get("by_count") for v in vals.values()):
            plot_count_error({f"{v} ({judged[v]['step']} steps)": m for v, m in vals.items()},
                             folder / "science-count-error.png", title="shapes val, equal training time")
            written.append("science-count-error.png")
    curves = {v: items[f"train_{v}"]["curve"] for v in VARIANTS if items.get(f"train_{v}", {}).get("status") == "ok"}
    if curves:
        fig = Figure(figsize=(7, 4), layout="constrained")
        FigureCanvasAgg(fig)
        axis = fig.subplots()
        for variant, curve in curves.items():
            axis.plot(*zip(*curve), label=variant)
        axis.set(xlabel="training seconds after the first log line", ylabel="loss", yscale="log",
                 title="shapes preset, equal wall time")
        axis.legend()
        fig.savefig(folder / "science-loss.png", dpi=100)
        written.append("science-loss.png")
    return written
