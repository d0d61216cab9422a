"""Stopping child processes by PID: SIGTERM to each, a shared grace period, then SIGKILL to what is left.

Used by `cosy up` for its broker and workers, and by the benchmarks' and the tests' process harnesses.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence


def stop_all(procs: Sequence[subprocess.Popen | None], grace_s: float) -> None:
    """Send SIGTERM in the given order, wait up to grace_s for all of them together, then kill the rest."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        if proc is None:
            continue
        try:
            proc.wait(max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
