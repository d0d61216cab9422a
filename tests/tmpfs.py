"""A small tmpfs for full-disk tests: mounted by the test itself where it runs as root, else a clean skip.

``with small_tmpfs(600 * 1024) as path:`` gives a folder where writes fail with ENOSPC past the size;
it is unmounted (lazily, so a process still holding a file cannot keep it) on the way out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NEEDS_ROOT = "mounting a tmpfs needs root (full-disk tests run as root in CI)"


def can_mount() -> str | None:
    """None when a tmpfs can be mounted here, else the reason to skip."""
    if os.geteuid() != 0:
        return NEEDS_ROOT
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount binaries"
    return None


@contextmanager
def small_tmpfs(size_bytes: int) -> Iterator[Path]:
    reason = can_mount()
    if reason is not None:
        pytest.skip(reason)
    where = Path(tempfile.mkdtemp(prefix="cosy-full-", dir="/tmp"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0777", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
        shutil.rmtree(where, ignore_errors=True)


def fill(path: Path, leave_bytes: int = 0) -> None:
    """Fill the filesystem at ``path`` until at most ``leave_bytes`` are free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free > leave_bytes:
        with open(path / ".filler", "wb") as f:
            try:
                f.write(b"\0" * (free - leave_bytes))
            except OSError:
                pass
