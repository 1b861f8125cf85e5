"""The two kinds of failure every command tells apart (docs/cli.md).

- `UserError`: something the user can fix -- a bad argument, a missing path or weights, a wrong variant, a
  busy folder. The message says what to do; the command prints it as one line and exits with status 2.
- `JobFailed`: the job ran and failed -- damage found by verify, inputs skipped under --strict, a NaN stop.
  One line too, exit status 1.

The subclasses below also derive from the built-in exception a caller would expect (`FileNotFoundError`,
`ValueError`, ...), so code that catches those keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message names the fix. Exit status 2."""


class JobFailed(Exception):
    """A job that ran and failed; the message says what was found and what to do. Exit status 1."""


class MissingPath(UserError, FileNotFoundError):
    """An input path (shard set, run directory, checkpoint, weights file) that is not there."""


class BadConfig(UserError, ValueError):
    """An option or configuration that cannot work (a value out of range, a wrong variant, a mismatch)."""


class Unavailable(UserError, RuntimeError):
    """Weights or a device that cannot be had here (no hub access, no GPU)."""


class UnknownName(UserError, KeyError):
    """A name that is not in a registry (variant, preset, option); the message lists the known ones."""

    __str__ = BaseException.__str__  # KeyError's own would print the message in quotes
