"""The GPU campaign (benchmarks.gpu) end to end at toy size on the CPU, and its failure isolation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.campaign import INJECT, Recorder, Stage, StageContext, run_stage
from benchmarks.report import campaign_markdown
from train.model import ABLATIONS, VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def campaign(out: Path, *args, env=None) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--work", str(out.parent / "work"),
                           "--wheels", str(out.parent / "no-wheels"), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    summary = json.loads((out / "campaign.json").read_text()) if (out / "campaign.json").is_file() else {}
    return done.returncode, summary, done.stdout + done.stderr


@pytest.mark.slow
def test_the_smoke_campaign_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    code, summary, output = campaign(out, "--smoke")
    assert code == 0, output[-3000:]
    stages = summary["stages"]
    assert summary["mode"] == "smoke" and summary["finished"] and list(stages) == ["tests", "train", "eval", "encode",
                                                                                   "science"]
    assert all(s["status"] == "ok" for s in stages.values()), {k: s["error"] for k, s in stages.items()}
    assert stages["tests"]["tests"] and stages["tests"]["counts"]["failed"] == 0  # skipped here: no CUDA
    train = stages["train"]["items"]
    assert all(train[f"{v}/eager"]["status"] == "ok" and train[f"{v}/eager"]["steps_per_s"] > 0
               for v in [*VARIANTS, *ABLATIONS])
    assert stages["train"]["speedup_if_xattn_eager"] > 0
    assert stages["eval"]["fid30k"]["total_s"] > 0 and stages["encode"]["coco2014"]["total_s"] > 0
    science = stages["science"]["items"]
    for variant in ("early_concat", "if_concat"):
        assert science[f"train_{variant}"]["steps"] >= 1
        judged = science[f"judge_{variant}"]
        assert judged["status"] == "ok" and 0 <= judged["val"]["match_ratio"] <= 1 and judged["holdout"]["num_images"]
    # What comes back from a GPU machine: at most 8 files, the summary among them, at most four PNGs.
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"campaign.json", "campaign.md", "campaign.log"} <= set(files)
    assert 1 <= sum(f.endswith(".png") for f in files) <= 4 and set(science["figures"]["files"]) <= set(files)
    markdown = (out / "campaign.md").read_text()
    assert markdown == campaign_markdown(summary) and "toy models on a CPU" in markdown
    assert "FID-30K" in markdown and "count match" in markdown


@pytest.mark.slow
def test_a_crashed_or_hung_stage_ends_alone_and_keeps_what_it_recorded(tmp_path):
    """Isolated stages: one killed by a signal, one stopped at its time limit; the campaign goes on."""
    out = tmp_path / "out"
    code, summary, output = campaign(out, "--smoke", "--isolate", "--stages", "tests,train,encode", "--budget", "16",
                                     env={INJECT: "tests:crash,train:hang"})
    stages = summary["stages"]
    assert code == 1 and list(stages) == ["tests", "train", "encode"], output[-2000:]
    assert stages["tests"]["status"] == "failed" and "SIGKILL" in stages["tests"]["error"]
    assert stages["train"]["status"] == "timeout" and stages["train"]["injected"] == "hang"
    assert stages["encode"]["status"] in ("ok", "timeout")  # it ran: what little budget was left is its own
    assert summary["elapsed_s"] < 16 + 15  # stopped on time (start-up of the interpreter aside)


def test_a_failing_item_or_stage_is_recorded_not_raised(tmp_path, capsys):
    rec = Recorder(tmp_path / "result.json")
    with rec.item("good") as out:
        out["x"] = 1
    with rec.item("bad") as out:
        out["partial"] = 2
        raise MemoryError("out of memory")
    saved = json.loads((tmp_path / "result.json").read_text())["items"]
    assert saved["good"]["status"] == "ok" and saved["good"]["x"] == 1
    assert saved["bad"] == {"status": "failed", "partial": 2, "error": "MemoryError: out of memory",
                            "seconds": saved["bad"]["seconds"]}
    ctx = StageContext(tmp_path / "missing", tmp_path, True, deadline=1e18)
    outcome = run_stage(Stage("missing", "A stage whose module is missing", "benchmarks.no_such_stage", 1), ctx,
                        isolate=False, env=dict(os.environ), log=sys.stderr)
    assert outcome.status == "failed" and "ModuleNotFoundError" in outcome.error
