"""benchmarks/results/ -> the README's performance table, generated, never typed."""
import json
from pathlib import Path

import pytest

from benchmarks import results

ROOT = Path(__file__).resolve().parents[1]


def test_readme_performance_block_is_the_generators_output():
    readme = (ROOT / "README.md").read_text()
    assert results.readme_block(results.load_results()) in readme, \
        "regenerate it: python -m benchmarks.results add DIR (or update_readme())"


def summary(started: str, stages: dict, mode: str = "full") -> dict:
    return {"mode": mode, "started": started, "machine": {"gpu": "NVIDIA H200", "cpu_cores": 16}, "stages": stages}


def train_stage(steps_per_s: float, status: str = "ok") -> dict:
    row = {"status": "ok", "variant": "early_concat", "steps_per_s": steps_per_s, "samples_per_s": 256 * steps_per_s,
           "tflops": 0.0249 * 256 * steps_per_s, "mfu": 0.5, "compiled": True}
    return {"status": status, "items": {"early_concat/compiled": row} if status == "ok" else {}}


def test_add_merges_a_rerun_and_the_table_names_the_machine(tmp_path):
    fid30k = {"total_s": 480, "goal_s": 600, "parts_s": {"sample": 400, "inception": 80}}
    first = summary("2026-12-01T10:00:00Z", {"train": train_stage(0, "timeout"),
                                             "eval": {"status": "ok", "items": {}, "fid30k": fid30k}})
    rerun = summary("2026-12-01T10:09:00Z", {"train": train_stage(17.5), "eval": {"status": "failed", "items": {}}})
    for name, data in (("a", first), ("b", rerun)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "campaign.json").write_text(json.dumps(data))
    target = results.add([tmp_path / "b", tmp_path / "a"], folder=tmp_path / "results")
    assert target.name == "nvidia-h200-2026-12-01.json" and target.with_suffix(".md").is_file()
    merged = json.loads(target.read_text())
    assert merged["stages"]["train"]["status"] == "ok"  # the re-run's success replaces the timeout
    assert merged["stages"]["eval"]["status"] == "ok"  # its failure does not replace the first run's success
    block = results.readme_block(results.load_results(tmp_path / "results"))
    assert "| NVIDIA H200 | 2026-12-01 | 17.50 steps/s compiled, MFU 50% |" in block and "8.0 min" in block


def test_smoke_runs_are_not_results(tmp_path):
    (tmp_path / "campaign.json").write_text(json.dumps(summary("2026-12-01T10:00:00Z", {}, mode="smoke")))
    with pytest.raises(ValueError, match="not results"):
        results.add([tmp_path], folder=tmp_path / "results")
    assert "No GPU has run the campaign yet" in results.readme_block([])
