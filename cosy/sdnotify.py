"""systemd's notify protocol (sd_notify(3)): one datagram per state change, no dependency.

Does nothing when NOTIFY_SOCKET is unset (not under systemd), so callers need not check.
"""

from __future__ import annotations

import math
import os
import socket
import time


def notify(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            # Never block the caller's event loop on a listener that is not reading: drop instead.
            sock.send(state.encode(), socket.MSG_DONTWAIT)
        return True
    except OSError:  # BlockingIOError included
        return False


class Watchdog:
    """Sends WATCHDOG=1 at half the interval systemd asked for (WatchdogSec=), from the caller's loop."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = bool(usec and usec.isdigit()) and (not pid or pid == str(os.getpid()))
        self.interval_s = int(usec) / 2e6 if enabled else 0.0  # type: ignore[arg-type]
        self._next = 0.0

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def due_in(self) -> float:
        """Seconds until the next ping is due, so a poll loop can wake up for it."""
        return math.inf if not self.enabled else max(0.0, self._next - time.monotonic())

    def tick(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now >= self._next:
            notify("WATCHDOG=1")
            self._next = now + self.interval_s
