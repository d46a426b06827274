"""User mistakes: one exception type, and one line on stderr for it at the command line.

A wrong flag, file or folder raises `UsageError` with a message naming the value; the entry
points run their `main` through `run_cli`, which prints `error: <message>` and exits 2 (as
argparse does for a bad flag). Every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

USAGE_EXIT_CODE = 2  # argparse's


class UsageError(ValueError):
    """A mistake in the user's input (flags, config file, data, paths): no traceback at the
    command line. A ValueError, so library callers may catch it as one."""


def run_cli(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`main(*args, **kwargs)`; a `UsageError` becomes `error: <message>` on stderr and exit 2."""
    try:
        return main(*args, **kwargs)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None


def check_positive(args: Any, *names: str) -> None:
    """Each `--name` of an argparse namespace must be >= 1."""
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")


def existing_folder(flag: str, value: str) -> Path:
    """`value` of `flag` as a Path, which must be a folder."""
    path = Path(value)
    if not path.is_dir():
        raise UsageError(f"{flag} {value}: {'not a folder' if path.exists() else 'no such folder'}")
    return path
