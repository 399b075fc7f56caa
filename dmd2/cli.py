"""Shared command-line plumbing: known errors become one clear line and a non-zero exit."""

from __future__ import annotations

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
