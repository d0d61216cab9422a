"""Exit codes of the `cosy` command (documented in README.md) and the one-line error helper."""

from __future__ import annotations

import sys
from typing import NoReturn

OK = 0
JOB_FAILED = 1
USAGE = 2
UNREACHABLE = 3
BUSY = 4
NO_SPACE = 5  # the disk (or quota) is full, or read-only: what was written is whole; free space and run it again
INTERRUPTED = 130


def fail(message: str, code: int) -> NoReturn:
    print(f"cosy: {message}", file=sys.stderr)
    raise SystemExit(code)
