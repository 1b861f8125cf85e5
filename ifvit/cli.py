"""The command-line convention of every entry point (docs/cli.md), in one place.

    @entry_point
    def main(argv: list[str]) -> int:
        args = ArgumentParser(prog="python -m train", ...).parse_args(argv)
        ...

- a user error (`ifvit.errors.UserError`, argparse's usage errors included) prints one line, `error: ...`
  saying what to do, and exits with status 2; no traceback;
- a job that ran and failed (`ifvit.errors.JobFailed`) prints one line and exits with status 1;
- `--debug` (on any command, anywhere on the line) or IFVIT_DEBUG=1 adds the traceback;
- Ctrl-C prints one line and exits with 130; anything else is a bug and shows its traceback as usual.

Under torchrun only rank 0 prints a user error: every rank meets the same one (they share the arguments,
and a busy folder is decided on rank 0 and broadcast).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from typing import Callable

from ifvit.errors import JobFailed, UserError

DEBUG_FLAG = "--debug"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (`error: ... (see PROG --help)`, status 2) and a --debug flag.

    Subparsers made with `add_subparsers().add_parser` are of this class too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Read by entry_point before parsing (and stripped), so it works before or after a subcommand;
        # declared here so that --help lists it.
        self.add_argument(DEBUG_FLAG, action="store_true", help="on an error, show the Python traceback too")

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`: itself, or the cause Ray wrapped it in (RayTaskError.cause)."""
    for candidate in (exc, getattr(exc, "cause", None), exc.__cause__):
        if isinstance(candidate, UserError):
            return candidate
    return None


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def entry_point(main: Callable[[list[str]], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap `main(argv) -> exit status` in the convention above; the result takes argv=None (sys.argv)."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in argv or os.environ.get("IFVIT_DEBUG") == "1"
        argv = [a for a in argv if a != DEBUG_FLAG]
        try:
            return int(main(argv) or 0)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2, its line already printed)
            if exc.code is None or isinstance(exc.code, int):
                return exc.code or 0
            raise
        except KeyboardInterrupt:
            print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 -- sorted into the three kinds, re-raised when a bug
            user = _user_error(exc)
            if user is None and not isinstance(exc, JobFailed):
                raise
            if debug:
                traceback.print_exc()
            if user is not None:
                if _is_rank0() or debug:
                    print(f"error: {one_line(user)}", file=sys.stderr)
                return 2
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 1

    return run
