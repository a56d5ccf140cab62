"""What the command-line entry points share: bad input ends in one line.

A user's mistake (a missing file, a malformed flag value, a workdir that
lacks a stage) is reported as `error: <message>` on stderr with exit code
2, not as a traceback; anything else still raises.
"""

from __future__ import annotations

from collections.abc import Callable
import sys
from typing import Any

from absl import app

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, PermissionError, RuntimeError, KeyError)


def run(main: Callable[[list[str]], Any], *,
        errors: tuple[type[BaseException], ...] = USER_ERRORS,
        **app_kwargs) -> None:
  """`absl.app.run(main)`, with `errors` printed as one line (exit 2)."""
  try:
    app.run(main, **app_kwargs)
  except errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
