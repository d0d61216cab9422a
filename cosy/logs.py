"""Logging: readable on a terminal, plain lines under journald (no timestamps: journald adds them)."""

from __future__ import annotations

import logging
import os
import sys


def setup(level: str = "INFO") -> None:
    under_journal = bool(os.environ.get("JOURNAL_STREAM"))
    if under_journal:
        fmt = "%(name)s: %(message)s"
    elif sys.stderr.isatty():
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr,
                        force=True)
