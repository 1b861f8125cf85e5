"""Stage 1: the test suite's GPU checks, `pytest -m gpu` (skipped, and so reported, on a machine without CUDA).

Only the test files that carry the gpu marker are collected: the others import Ray and friends, which a
bare GPU image lacks, and collecting them would cost time for no test.
"""
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from benchmarks.campaign import ROOT, Recorder, StageContext

MARKER = "mark.gpu"


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if MARKER in p.read_text())


def outcomes(junit_xml) -> dict[str, dict]:
    """{test id: {"outcome": passed|failed|error|skipped, "seconds", "message"?}} from pytest's JUnit XML."""
    tests = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        entry = {"outcome": "passed", "seconds": round(float(case.get("time") or 0), 2)}
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                entry["outcome"] = {"failure": "failed"}.get(tag, tag)
                entry["message"] = (node.get("message") or node.text or "")[:400]
        tests[name] = entry
    return tests


VERBOSE_LINE = re.compile(r"^tests/(\w+)\.py::(\S+) (PASSED|FAILED|ERROR|SKIPPED)")


def outcomes_from_log(text: str) -> dict[str, dict]:
    """The same from `pytest -v` lines, for a run stopped before it could write its XML."""
    return {f"{m[1]}::{m[2]}": {"outcome": m[3].lower()} for m in map(VERBOSE_LINE.match, text.splitlines()) if m}


def run(rec: Recorder, ctx: StageContext) -> None:
    files = gpu_test_files()
    junit, log_path = ctx.work / "junit.xml", ctx.work / "pytest.log"
    junit.unlink(missing_ok=True)
    per_test = int(min(max(ctx.remaining(), 10), 120))
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-o", f"timeout={per_test}",
           f"--junitxml={junit}", *files]
    rec.set("command", " ".join(["python", *cmd[1:]]))
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(ctx.remaining() - 3, 5)).returncode
        except subprocess.TimeoutExpired:
            code = None  # killed at the stage's limit: the tests that finished are in the log
    text = log_path.read_text(errors="replace")
    print(text[-20_000:])
    tests = outcomes(junit) if junit.is_file() else outcomes_from_log(text)
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    rec.set("tests", tests)
    rec.set("counts", counts)
    rec.set("exit_code", code)
    if code is None:
        raise TimeoutError(f"pytest stopped at the stage's limit after {len(tests)} test(s); the rest did not run")
    if not tests:
        raise RuntimeError(f"pytest ran no test (exit {code}): {text[-400:]}")
    if code not in (0, 5) or counts["failed"] or counts["error"]:
        raise RuntimeError(f"{counts['failed']} GPU test(s) failed, {counts['error']} error(s) (pytest exit "
                           f"{code}); see the tests in campaign.json")
