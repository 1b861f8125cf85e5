"""One job per output folder (ifvit.lock): the holder is named, a dead holder's lock is taken over, another
host's is reported with how to clear it; and the race of two real jobs into one folder, for the pipeline
and for training, ends with a clear message while the first job's output stays intact."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ifvit.lock import LOCK_FILE, FolderBusy, FolderLock

ROOT = Path(__file__).resolve().parents[1]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_folder_names_its_holder_and_is_free_again_after_release(tmp_path):
    with FolderLock(tmp_path, "job one"):
        with pytest.raises(FolderBusy, match=rf"in use by pid {os.getpid()} on this host .*job one.*kill {os.getpid()}"):
            FolderLock(tmp_path, "job two").acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    FolderLock(tmp_path).acquire().release()


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                                  "command": "a killed job", "token": "old"}))
    lock = FolderLock(tmp_path, "the re-run").acquire()
    assert lock.took_over["command"] == "a killed job" and "taking over" in capsys.readouterr().err
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_from_another_host_is_reported_with_how_to_clear_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "node-7", "pid": 4242, "command": "train",
                                                  "token": "x"}))
    with pytest.raises(FolderBusy, match=rf"pid 4242 on host node-7.*delete {tmp_path / LOCK_FILE}"):
        FolderLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).exists()  # never removed from here: that process may be alive


def wait_for_lock(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / LOCK_FILE).is_file():
            try:
                return json.loads((folder / LOCK_FILE).read_text())
            except json.JSONDecodeError:
                pass  # being written
        if proc.poll() is not None:
            pytest.fail(f"the first job ended before the second started:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the first job never took its lock")


@pytest.mark.slow  # a real pipeline job in its own process: ~30 s on 2 cores, most of it the encoder actor's start
def test_two_pipeline_jobs_into_one_folder(ray_local, tmp_path, capsys):
    from pipeline.__main__ import main
    from pipeline.verify import verify

    out = tmp_path / "shapes"
    args = ["shapes", "--out", str(out), "--train-images", "32", "--val-images", "8", "--holdout-images", "8",
            "--shard-size", "8"]
    first = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--ray-address",
                              ray_local.get_runtime_context().gcs_address], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"})
    holder = wait_for_lock(out, first)
    assert main(args) == 2  # the second job stops at once, before touching the folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by pid {holder['pid']}" in err[0] and first.pid == holder["pid"]
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    assert verify(out) and json.loads((out / "manifest.json").read_text())["counts"]["records"] == 48


def test_two_trainings_into_one_run_directory(shapes_shards, tmp_path, capsys):
    from train.__main__ import main
    from train.checkpoint import list_checkpoints

    out = tmp_path / "run"
    args = ["--variant", "if_concat", "--shards", str(shapes_shards), "--out", str(out), "--preset", "tiny",
            "--width", "32", "--depth", "3", "--heads", "2", "--patch-size", "8", "--batch-size", "4",
            "--steps", "400", "--log-every", "50", "--ckpt-every", "200", "--preview-every", "0", "--num-workers", "0"]
    from train.trainer import train  # noqa: F401 -- imported now, so the second job reaches the lock at once
    first = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                            "PYTHONPATH": str(ROOT)})
    holder = wait_for_lock(out, first)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by pid {holder['pid']}" in err[0]
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [200, 400]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == \
        list(range(50, 401, 50))
    assert not (out / LOCK_FILE).exists()
