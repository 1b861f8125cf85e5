"""One job per output folder: an exclusive lock file naming its holder (docs/cli.md, "Busy folders").

    with FolderLock("runs/if_concat", "python -m train"):
        ...                                   # a second job into the same folder exits at once, saying who holds it

The lock is a file `.ifvit.lock` in the folder, created with O_EXCL (exclusive on local disks and on NFS)
and holding {"host", "pid", "started", "command", "token"}. A second job that finds it:
- on the same host, with the holder still running: raises FolderBusy naming the pid and how to stop it;
- on the same host, with the holder dead (killed, crashed): takes the lock over and says so;
- from another host: cannot tell whether that process lives, so raises FolderBusy naming the host, the
  pid and the file to delete once that job is known to be gone.
Take-over happens on one host only and is guarded there by flock on a file in the temporary folder (keyed
by the folder's real path), so two jobs finding the same stale lock cannot both win.
In multi-process jobs one process (the driver, or rank 0) holds the lock for all of them.

Standard library only (see ifvit/__init__.py).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ifvit.errors import UserError

LOCK_FILE = ".ifvit.lock"
_WRITE_GRACE_S = 5.0  # a lock file still empty after this long was left by a writer killed mid-create


class FolderBusy(UserError):
    """Another job holds the folder; the message names it and what to do."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), to tell a live holder from a new process with its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    now = _process_start(pid)
    return started is None or now is None or now == started


class FolderLock:
    """Exclusive use of `folder` (created if missing) by this process; `purpose` names the job in messages."""

    def __init__(self, folder: str | os.PathLike, purpose: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.purpose = purpose or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        self.token: str | None = None
        self.took_over: dict | None = None  # the stale holder replaced, if any

    # ---------------------------------------------------------------------------------------- acquire

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.purpose,
                "token": uuid.uuid4().hex}
        for _ in range(10):  # a few rounds: each lost race re-reads who won
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:  # vanished, or being written by its creator this instant
                    continue
                self._take_over_if_stale(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
                f.flush()
                os.fsync(f.fileno())
            self.token = info["token"]
            return self
        raise FolderBusy(f"could not lock {self.folder}: other jobs keep taking {self.path}; run one at a time")

    def _read_holder(self) -> dict | None:
        """The holder's record; None if the file is gone or still being written (then wait a moment)."""
        deadline = time.monotonic() + _WRITE_GRACE_S
        while True:
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
            if time.monotonic() > deadline or time.time() - self._mtime() > _WRITE_GRACE_S:
                return {"unreadable": text[:200]}  # a creator killed between create and write
            time.sleep(0.05)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return time.time()

    def _take_over_if_stale(self, holder: dict) -> None:
        here = socket.gethostname()
        if "unreadable" not in holder:
            if holder.get("host") != here:
                raise FolderBusy(
                    f"{self.folder} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
                    f"(since {holder.get('started')}: {holder.get('command')}). Wait for that job, or stop it "
                    f"there; if it is gone (its machine crashed), delete {self.path} and run again")
            if _alive(int(holder["pid"]), holder.get("process_start")):
                raise FolderBusy(
                    f"{self.folder} is in use by pid {holder['pid']} on this host (since {holder.get('started')}: "
                    f"{holder.get('command')}). Wait for it to finish, stop it (kill {holder['pid']}), "
                    "or pass another output folder")
        self._remove_if_unchanged(holder)
        self.took_over = holder
        print(f"{self.folder}: the previous job (pid {holder.get('pid', '?')}, {holder.get('command', '?')}) "
              "is gone; taking over its lock", file=sys.stderr)

    def _remove_if_unchanged(self, stale: dict) -> None:
        """Delete the lock file only if it still holds `stale`: of two jobs that found the same dead holder,
        the second must not delete the lock the first has just created."""
        key = hashlib.sha256(os.path.realpath(self.folder).encode()).hexdigest()[:16]
        with open(Path(tempfile.gettempdir()) / f"ifvit-lock-{key}.guard", "a") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
            except OSError:  # a file system without flock: the race window is a few microseconds wide
                pass
            if self._read_holder() == stale:
                self.path.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------- release

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        if self.token is None:
            return
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        self.token = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
