"""`make gpu-check`: every GPU figure this toolkit claims, in one budgeted command on a bare GPU machine.

    python -m benchmarks.gpu --out DIR [--budget 420] [--stages tests,train,eval,encode,science] [--smoke]

Stages (docs/gpu-campaign.md says what each figure means):
  tests    pytest -m gpu: bf16 autocast, torch.compile without recompiles, flash SDPA selected, the
           trainer's single-GPU loop
  train    training throughput of the 4 variants and 4 ablations at the paper's configuration: steps/s,
           images/s, TFLOP/s (true FLOPs), MFU against the bf16 peak and the measured matmul rate
  eval     sampling, SD-VAE decoding, Inception and CLIP throughput; projected FID-30K time
  encode   SD-VAE encoder, CLIP text tower, CPU preprocessing and shard writing; projected COCO 2014 time
  science  shapes shards (local executor), early_concat vs if_concat for equal wall time, judged

It never installs from a network (and never runs `make setup`): it uses the interpreter it runs on, and
installs the carried wheelhouse (.whl/) offline into a private folder when packages are missing. Each
stage runs in its own interpreter with its own share of --budget, and DIR/campaign.json and campaign.md are
rewritten after every stage, so a timeout or a crash loses only the stage in flight. --smoke runs every
stage at toy size on a CPU in seconds (the test suite does), in this process unless --isolate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import environment
from benchmarks.campaign import BY_NAME, STAGES, StageContext, run_stage
from benchmarks.report import campaign_markdown, stage_line
from ifvit.cli import ArgumentParser, entry_point
from ifvit.files import atomic_write_bytes, atomic_write_json
from ifvit.lock import FolderLock

DEFAULT_BUDGET = 420  # seconds: leaves a 15-minute GPU lease room for start-up and a short second run
SMOKE_BUDGET = 300
FILES = ("campaign.json", "campaign.md", "campaign.log")  # plus at most four PNGs from the stages
RESERVE = 5  # seconds kept back for writing the summary at the end
GRACE = 10  # seconds a stage may overrun its share before it is stopped (taken from the stages after it)


def parse_stages(text: str) -> list[str]:
    names = []
    for token in (t.strip() for t in text.split(",") if t.strip()):
        name = STAGES[int(token) - 1].name if token.isdigit() and 1 <= int(token) <= len(STAGES) else token
        if name not in BY_NAME:
            raise argparse.ArgumentTypeError(f"unknown stage {token!r}: choose from {', '.join(BY_NAME)} (or 1-5)")
        names.append(name)
    return sorted(set(names), key=[s.name for s in STAGES].index)


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0],
                       epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for campaign.json, campaign.md, campaign.log and the PNGs")
    p.add_argument("--budget", type=float, help=f"seconds for the whole campaign (default {DEFAULT_BUDGET}; "
                                                f"{SMOKE_BUDGET} with --smoke)")
    p.add_argument("--stages", type=parse_stages, default=[s.name for s in STAGES],
                   help="comma-separated stages or numbers (default: all five)")
    p.add_argument("--smoke", action="store_true", help="every stage at toy size on the CPU (seconds each)")
    p.add_argument("--work", help="scratch folder: shards, runs, compile caches, the installed wheelhouse "
                                  "(default /tmp/ifvit-gpu-check; --smoke: OUT/../work)")
    p.add_argument("--wheels", default=str(environment.ROOT / ".whl"), help="the wheelhouse (default .whl)")
    isolation = p.add_mutually_exclusive_group()
    isolation.add_argument("--isolate", action="store_true", default=None,
                           help="each stage in its own interpreter (the default, except with --smoke)")
    isolation.add_argument("--in-process", dest="isolate", action="store_false")
    return p


@entry_point
def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    with FolderLock(args.out, "python -m benchmarks.gpu"):  # two campaigns into one folder would mix their files
        return campaign(args)


def campaign(args) -> int:
    started = time.monotonic()
    budget = args.budget or (SMOKE_BUDGET if args.smoke else DEFAULT_BUDGET)
    isolate = (not args.smoke) if args.isolate is None else args.isolate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*(p for s in STAGES for p in out.glob(f"{s.name}-*.png")), *(out / f for f in FILES)]:
        stale.unlink(missing_ok=True)  # a previous campaign's files would mix with this one's
    work = Path(args.work) if args.work else (out.parent / "work" if args.smoke else Path("/tmp/ifvit-gpu-check"))
    work.mkdir(parents=True, exist_ok=True)

    with open(out / "campaign.log", "w") as log:
        def say(line: str = "") -> None:
            print(line, flush=True)
            log.write(line + "\n")
            log.flush()

        prepared = environment.prepare(Path(args.wheels), work / "site")
        env = environment.stage_environment(prepared.pop("env"), work, args.smoke)
        os.environ.update(env)  # the stages that run in this process see what isolated ones see
        if args.smoke:
            import torch

            torch.set_num_threads(1)
        info = environment.describe()
        environment.print_summary(info, prepared)
        environment.print_summary(info, prepared, file=log)
        summary = {"campaign_version": 1, "mode": "smoke" if args.smoke else "full",
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": budget,
                   "isolated": isolate, "machine": info, "packages": prepared, "stages": {}, "finished": None}

        def write() -> None:
            summary["elapsed_s"] = round(time.monotonic() - started, 1)
            atomic_write_json(out / "campaign.json", summary)
            atomic_write_bytes(out / "campaign.md", campaign_markdown(summary).encode())

        write()
        todo = [BY_NAME[name] for name in args.stages]
        for i, stage in enumerate(todo):
            left = budget - (time.monotonic() - started) - RESERVE
            allowance = max(left * stage.weight / sum(s.weight for s in todo[i:]), 1.0)
            say(f"\n== {stage.name}: {stage.title} ({allowance:.0f} s of {max(left, 0):.0f} s left"
                f"{', toy size' if args.smoke else ''})")
            ctx = StageContext(work / stage.name, out, args.smoke, time.monotonic() + allowance)
            # The hard stop comes a little after the stage's own deadline, never past the campaign's budget.
            grace = max(min(GRACE, left - allowance), RESERVE)
            outcome = run_stage(stage, ctx, isolate=isolate, env=env, log=log, grace=grace)
            summary["stages"][stage.name] = {"status": outcome.status, "seconds": round(outcome.seconds, 1),
                                             "budget_s": round(allowance, 1), "error": outcome.error,
                                             **outcome.result}
            write()
            say(stage_line(stage.name, summary["stages"][stage.name]))
        summary["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write()
        say("\n" + campaign_markdown(summary, brief=True))
        say(f"wrote {out}/campaign.json, campaign.md, campaign.log" +
            "".join(f", {p.name}" for p in sorted(out.glob("*.png"))))
    return 0 if all(s["status"] == "ok" for s in summary["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
