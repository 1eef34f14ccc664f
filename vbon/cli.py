"""How the commands (the evaluation, the benchmark) end: a known error is one line on stderr
and exit status 1 (its traceback with --debug), Ctrl-C is exit status 130."""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def run_command(
    body: Callable[[], int], *, debug: bool, errors: tuple[type[BaseException], ...]
) -> int:
    """body()'s exit status, or the status of the error it raised (one of `errors`)."""
    try:
        return body()
    except errors as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
