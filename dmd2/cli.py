"""Shared command-line plumbing: known errors become one clear line and a non-zero exit."""

from __future__ import annotations

import shlex
import sys

from dmd2.families.base import ModelLoadError


class UsageError(ValueError):
    """A bad argument value detected after parsing (unknown model, bad label, ...)."""


KNOWN_ERRORS = (UsageError, ModelLoadError, FileNotFoundError, PermissionError, IsADirectoryError,
                NotADirectoryError, ValueError, FloatingPointError, OSError)


def run_cli(fn, extra_errors: tuple = ()) -> None:
    """Run `fn()`; print known errors as `error: ...` on stderr and exit 1 instead of a traceback."""
    try:
        fn()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except KNOWN_ERRORS + tuple(extra_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def invocation() -> str:
    """The command line as a user would type it (`python -m pkg ...`), for run folders and model cards."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0] = "python -m " + argv[0].rstrip("/").split("/")[-2]
        return " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]])
    return " ".join(shlex.quote(a) for a in argv)
