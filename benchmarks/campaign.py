"""The campaign's machinery: the stages, their time shares, and running one so that it fails alone.

A stage is a module with `run(rec: Recorder, ctx: StageContext) -> None`. It records every figure through
`rec` as soon as it has it (`rec.set`, `rec.item`), and `rec` rewrites the stage's result.json each time,
so a stage killed at its time limit still leaves what it finished. Each item inside a stage (a variant, a
batch size) fails alone: `with rec.item(name) as out:` records the exception instead of raising it.

    python -m benchmarks.campaign STAGE --dir DIR --seconds S --figures OUT [--smoke]

runs one stage in its own interpreter: what `benchmarks.gpu` does on a GPU machine, so that a hung
compilation, a crashed kernel or a poisoned CUDA context ends that stage only.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ifvit.cli import ArgumentParser, entry_point
from ifvit.files import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    module: str
    weight: float  # share of the budget, against the other stages still to run


STAGES = (
    Stage("tests", "GPU tests (pytest -m gpu)", "benchmarks.stage_tests", 60),
    Stage("train", "Training throughput", "benchmarks.stage_train", 125),
    Stage("eval", "Evaluation cost", "benchmarks.stage_eval", 45),
    Stage("encode", "Encoding cost", "benchmarks.stage_encode", 20),
    Stage("science", "Science at GPU size (shapes)", "benchmarks.stage_science", 170),
)
BY_NAME = {s.name: s for s in STAGES}
RESULT = "result.json"


@dataclass
class StageContext:
    work: Path  # this stage's scratch folder
    figures: Path  # where its PNGs go (the campaign's --out)
    smoke: bool
    deadline: float  # time.monotonic() by which it must be done

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


class Recorder:
    """A stage's result dict, rewritten atomically to `path` after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"items": {}, "finished": False}
        self.flush()

    def flush(self) -> None:
        atomic_write_json(self.path, self.data)

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()

    def skip(self, name: str, reason: str) -> None:
        self.data["items"][name] = {"status": "not run", "reason": reason}
        self.flush()

    @contextmanager
    def item(self, name: str):
        """Record one measurement: {"status": "ok", ...what the block put in `out`, "seconds"} or, when the
        block raises, {"status": "failed", "error": ...}; the exception goes no further."""
        out: dict = {}
        start = time.monotonic()
        try:
            yield out
            entry = {"status": "ok", **out}
        except Exception as e:  # noqa: BLE001 - one item's failure (OOM, compile error, ...) must not end the stage
            traceback.print_exc()
            entry = {"status": "failed", **out, "error": error_text(e)}
        if entry["status"] == "failed":
            free_gpu_memory()  # here, once the exception and the frames it holds are gone
        entry["seconds"] = round(time.monotonic() - start, 2)
        self.data["items"][name] = entry
        self.flush()

    def finish(self) -> None:
        self.data["finished"] = True
        self.flush()


def error_text(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[:limit] + " ..."


def stage_device(ctx: "StageContext"):
    """The GPU unless --smoke (or none is there), with TF32 on for fp32 work as the trainer, the pipeline and
    evaluate run it."""
    import torch

    cuda = torch.cuda.is_available() and not ctx.smoke
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda" if cuda else "cpu")


def free_gpu_memory() -> None:
    """After an out-of-memory error the cached blocks of the failed item would starve the next one."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


# Debugging aid for the tests: "STAGE:fail", "STAGE:hang" or "STAGE:crash" (comma-separated for several)
# makes that stage misbehave.
INJECT = "IFVIT_CAMPAIGN_INJECT"


def run_in_process(stage: Stage, ctx: StageContext) -> None:
    ctx.work.mkdir(parents=True, exist_ok=True)
    rec = Recorder(ctx.work / RESULT)
    injected = dict(entry.partition(":")[::2] for entry in os.environ.get(INJECT, "").split(",") if entry)
    how = injected.get(stage.name)
    if how:
        rec.set("injected", how)
        if how == "hang":
            time.sleep(3600)
        if how == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure ({INJECT}: {stage.name}:{how})")
    importlib.import_module(stage.module).run(rec, ctx)
    rec.finish()


# ----------------------------------------------------------------------------------------- the runner

@dataclass
class Outcome:
    status: str  # "ok" | "failed" | "timeout"
    seconds: float
    result: dict
    error: str | None = None


def read_result(work: Path) -> dict:
    try:
        return json.loads((work / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_stage(stage: Stage, ctx: StageContext, *, isolate: bool, env: dict, log, grace: float = 10.0) -> Outcome:
    """Run one stage, stopped `grace` seconds after `ctx.deadline` (isolated: in its own interpreter) at
    the latest; whatever it recorded is kept whatever happens."""
    start = time.monotonic()
    error = None
    if not isolate:
        try:
            run_in_process(stage, ctx)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - the next stage runs regardless
            traceback.print_exc(file=log)
            status, error = "failed", error_text(e)
        return Outcome(status, time.monotonic() - start, read_result(ctx.work), error)

    ctx.work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.campaign", stage.name, "--dir", str(ctx.work),
           "--seconds", f"{max(ctx.remaining(), 1):.1f}", "--figures", str(ctx.figures)] + (["--smoke"] if ctx.smoke else [])
    stage_log = ctx.work / "stage.log"
    with open(stage_log, "w") as out:
        # Its own process group: a timeout ends the stage and everything it started (pytest, trainers, pools).
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(ctx.remaining(), 0) + grace)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(proc)
    copy_tail(stage_log, log)
    result = read_result(ctx.work)
    if timed_out:
        status, error = "timeout", f"stopped at its limit of {time.monotonic() - start:.0f} s; finished items kept"
    elif proc.returncode == 0 and result.get("finished"):
        status = "ok"
    else:
        status = "failed"
        error = result.get("error") or f"the stage process exited with {describe_exit(proc.returncode)}; see campaign.log"
    return Outcome(status, time.monotonic() - start, result, error)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the stage's process group (a trainer checkpoints on it), SIGKILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def describe_exit(code: int) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}" + (" (killed: out of memory?)" if -code == 9 else "")
    return f"exit code {code}"


def copy_tail(path: Path, log, limit: int = 48_000) -> None:
    """The end of a stage's own log into the campaign log (capped: what comes back is limited)."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    text = data[-limit:].decode("utf-8", "replace")
    log.write(("[... earlier output cut]\n" if len(data) > limit else "") + text)
    log.flush()


@entry_point
def main(argv: list[str]) -> int:
    p = ArgumentParser(prog="python -m benchmarks.campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(BY_NAME))
    p.add_argument("--dir", required=True, help="the stage's scratch folder (result.json goes here)")
    p.add_argument("--seconds", type=float, required=True, help="the stage's time budget")
    p.add_argument("--figures", required=True, help="folder for the stage's PNGs")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    ctx = StageContext(Path(args.dir), Path(args.figures), args.smoke, time.monotonic() + args.seconds)
    try:
        run_in_process(BY_NAME[args.stage], ctx)
    except Exception as e:  # noqa: BLE001 - recorded for the campaign, then a non-zero exit
        traceback.print_exc()
        result = read_result(ctx.work)
        result["error"] = error_text(e)
        atomic_write_json(ctx.work / RESULT, result)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
