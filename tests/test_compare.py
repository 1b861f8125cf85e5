"""evaluate.compare on two tiny trained runs: every section and plot, and the report's numbers are
metrics.json's. A third run (a copy of early_concat with another seed and other judge numbers) checks the
grouping over seeds; a fourth folder without an evaluation checks that bad input is reported, not fatal."""
import json
import shutil
import statistics

import pytest
from PIL import Image

from evaluate import compare, compare_runs
from tiny_runs import tiny_runs

SECTIONS = ["## Runs", "## Cost", "## Quality and alignment", "## Intermediate against early fusion",
            "## Samples", "## Guidance sweep", "## Training curves", "## Count alignment", "## Main metrics",
            "## Left out"]
PLOTS = ["samples", "guidance", "training", "count_error", "metrics"]


@pytest.fixture(scope="module")
def runs(shapes_shards, tmp_path_factory):
    return tiny_runs(shapes_shards, tmp_path_factory.getbasetemp() / "tiny_runs")


def copy_run(src, dst, edit_config=None, edit_metrics=None):
    """A run folder without its checkpoints (the report never opens them), optionally edited."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tb", "sweep"))
    for name, edit in (("config.json", edit_config), ("eval/metrics.json", edit_metrics)):
        if edit:
            data = json.loads((dst / name).read_text())
            edit(data)
            (dst / name).write_text(json.dumps(data))
    return dst


def md_table(text, header_start):
    """Rows of the Markdown table whose header line starts with `header_start`, as {first cell: {col: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")

    def other_seed(config):
        config["train"]["seed"] = 1

    def other_numbers(metrics):
        metrics["shapes"]["val"]["count_error"] += 0.5
        metrics["shapes"]["val"]["match_ratio"] = 0.25

    seed1 = copy_run(runs["early_concat"], root / "early_concat-s1", other_seed, other_numbers)
    (root / "not_evaluated").mkdir()
    (root / "not_evaluated" / "config.json").write_text(json.dumps({"variant": "if_xattn"}))
    out = root / "report"
    compare.main([str(runs["early_concat"]), str(runs["if_concat"]), str(seed1), str(root / "not_evaluated"),
                  "--out", str(out)])
    return out, runs, seed1


@pytest.mark.slow
def test_report_has_every_section_and_plot(report):
    out, _, _ = report
    text = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in text, section
    data = json.loads((out / "report.json").read_text())
    assert set(data["plots"]) == set(PLOTS)
    for name in PLOTS:
        assert f"]({name}.png)" in text
        with Image.open(out / f"{name}.png") as image:
            assert min(image.size) > 200
    assert "loss" in data["plots"]["training"]["panels"]
    assert "shapes_match_ratio" in data["plots"]["training"]["panels"]  # count accuracy against the step
    assert "shapes_exact" in data["plots"]["guidance"]["panels"]
    assert "ablations" not in data["plots"]  # no ablation run here
    assert any("not_evaluated" in p and "python -m evaluate --run" in p for p in data["problems"])


@pytest.mark.slow
def test_report_numbers_equal_metrics_json(report):
    out, runs, _ = report
    text = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    metrics = json.loads((runs["if_concat"] / "eval" / "metrics.json").read_text())
    shapes = metrics["shapes"]
    row = next(r for r in data["runs"] if r["label"] == "if_concat")
    assert row["params"] == metrics["params"]
    assert row["gflops_true"] == metrics["gflops_true"] and row["gflops_paper"] == metrics["gflops_paper"]
    assert row["count_error"] == shapes["val"]["count_error"]
    assert row["holdout_exact_accuracy"] == shapes["holdout"]["exact_accuracy"]
    assert row["sampling_images_per_s"] == metrics["sampling"]["images_per_s"]
    assert row["fid"] is None and row["clip_s"] is None  # skipped offline, and said so
    assert "Skipped metrics" in text

    per_run = md_table(text, "| run | exact scene")["if_concat"]
    for metric in compare_runs.QUALITY:
        value = metric.get(metrics)
        if value is not None:
            assert per_run[metric.title] == compare_runs.fmt(value, metric.digits), metric.key
    cost = md_table(text, "| group | params")["if_concat"]
    assert cost["params"] == f"{metrics['params']:,}"
    assert cost["GFLOPs (true) ↓"] == compare_runs.fmt(metrics["gflops_true"])
    assert cost["GFLOPs (paper conv.) ↓"] == compare_runs.fmt(metrics["gflops_paper"])

    log = [json.loads(line) for line in (runs["if_concat"] / "metrics.jsonl").read_text().splitlines()]
    assert row["train_steps_per_s"] == statistics.median(r["steps_per_s"] for r in log[1:])


@pytest.mark.slow
def test_runs_differing_only_in_seed_are_one_group_with_mean_and_std(report):
    out, runs, seed1 = report
    data = json.loads((out / "report.json").read_text())
    assert [g["label"] for g in data["groups"]] == ["early_concat", "if_concat"]
    early = data["groups"][0]
    assert early["runs"] == ["early_concat", "early_concat-s1"]
    values = [json.loads((r / "eval" / "metrics.json").read_text())["shapes"]["val"]["count_error"]
              for r in (runs["early_concat"], seed1)]
    assert early["count_error"] == {"mean": pytest.approx(statistics.fmean(values)),
                                    "std": pytest.approx(statistics.stdev(values)), "n": 2}
    cell = md_table((out / "report.md").read_text(), "| group | exact scene")["early_concat"]["count error (Eq. 9) ↓"]
    assert cell == f"{compare_runs.fmt(early['count_error']['mean'])} ± {compare_runs.fmt(early['count_error']['std'])} (n=2)"
    delta = next(d for d in data["fusion_deltas"] if d["metric"] == "count_error")
    if_value = data["groups"][1]["count_error"]["mean"]
    assert delta["delta"] == pytest.approx(if_value - statistics.fmean(values)) and delta["n"] == [2, 1]


@pytest.mark.slow
def test_same_prompts_and_seeds_in_the_sample_grid(report):
    out, runs, _ = report
    data = json.loads((out / "report.json").read_text())
    assert data["samples"]
    for run in runs.values():
        index = [json.loads(line) for line in (run / "eval" / "samples" / "index.jsonl").read_text().splitlines()]
        have = {(e["prompt"], e["seed"]) for e in index}
        assert all((p["prompt"], p["seed"]) in have for p in data["samples"])


@pytest.mark.slow
def test_fid_clip_trade_off_and_ablations_when_present(runs, tmp_path):
    """GPU-like metrics (FID and CLIP score present) give the FID-vs-CLIP plot; an ablation run gives Fig. 7."""
    def with_fid(offset):
        def edit(metrics):
            metrics["fid"], metrics["clip_score"] = 30.0 + offset, {"clip_s": 0.5 + offset / 100, "cos100": 20.0}
            for i, row in enumerate(metrics["by_scale"]):
                row["fid"], row["clip_s"] = 40.0 - 5 * i + offset, 0.4 + 0.05 * i
        return edit

    def ablation(config):
        config["variant"] = "if_concat_t0i4"
        config["model"]["n_text"] = 0

    a = copy_run(runs["early_concat"], tmp_path / "a", edit_metrics=with_fid(0))
    b = copy_run(runs["if_concat"], tmp_path / "b", edit_metrics=with_fid(1))
    c = copy_run(runs["if_concat"], tmp_path / "c", ablation, with_fid(2))
    data = compare.build_report([a, b, c], tmp_path / "out")
    assert data["plots"]["guidance"]["panels"][0] == "trade-off"
    assert "ablations" in data["plots"] and "fid" in data["plots"]["ablations"]["panels"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Ablations (Fig. 7)" in text
    assert md_table(text, "| run | FID")["c"]["FID"] == "32"
    assert md_table(text, "| run | FID")["b"]["CLIP-S"] == "0.51"


def test_training_speed_skips_the_start_up_window_and_grouping_ignores_only_bookkeeping():
    rows = [{"steps_per_s": 0.1, "mfu": None}, {"steps_per_s": 2.0, "mfu": 0.3}, {"steps_per_s": 4.0, "mfu": 0.5}]
    assert compare_runs.training_speed(rows) == {"train_steps_per_s": 3.0, "train_samples_per_s": None, "train_mfu": 0.4}
    base = {"variant": "if_xattn", "model": {"width": 8}, "shards": "s", "train": {"seed": 0, "lr": 1e-3}}

    def key(**train):
        config = json.loads(json.dumps(base))
        config["train"].update(train)
        return compare_runs.experiment_key(compare_runs.Run(None, "x", config, {"step": 10}))

    assert key(seed=1, num_workers=8) == key()
    assert key(lr=2e-4) != key()
