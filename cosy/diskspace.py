"""Writes that may run out of space: which errors mean it, a message that names the device, an atomic write.

A full disk (ENOSPC), an exhausted quota (EDQUOT) and a read-only filesystem (EROFS) are the "no space" errors:
the user fixes them outside cosy (free space, raise the quota, remount) and runs the same command again. The
CLI exits with ``cosy.cli.exits.NO_SPACE`` on them, the HTTP gateway answers 507 Insufficient Storage, and a
worker whose cache cannot be written goes on without it.

Write the bytes with :func:`write_file` / :func:`write_atomic` rather than through a library that writes the
file itself: libsndfile reports a full disk as "System error." and torch as a RuntimeError, with no errno; encode
into memory first (``soundfile.write(io.BytesIO(), ...)``, ``torch.save(obj, io.BytesIO())``), then write.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_no_space(exc: BaseException) -> bool:
    """True for a full disk, an exhausted quota or a read-only filesystem."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


def _unescape(field: str) -> str:
    """/proc/self/mounts writes a space, tab, newline and backslash in a path as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_of(path: Path | str) -> tuple[str, str]:
    """(mount point, filesystem type) of the filesystem that holds ``path`` (or would: its nearest existing
    parent). The type is "" where /proc/self/mounts cannot be read."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    real = os.path.realpath(p)
    best, fstype = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = _unescape(fields[1])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):  # the last of equal mounts is the one on top
                    best, fstype = point, fields[2]
    except OSError:
        pass
    if not best:
        best = real
        while not os.path.ismount(best) and best != os.path.dirname(best):
            best = os.path.dirname(best)
    return best, fstype


def device(path: Path | str) -> str:
    """The filesystem holding ``path`` as a user reads it: its mount point and type, e.g. ``/srv (ext4)``."""
    point, fstype = mount_of(path)
    return f"{point} ({fstype})" if fstype else point


def describe(exc: OSError, path: Path | str) -> str:
    """'no space left on /srv (ext4)', 'disk quota exceeded on ...' or 'read-only filesystem on ...'."""
    where = device(path)
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded on {where}"
    if exc.errno == errno.EROFS:
        return f"read-only filesystem on {where}"
    return f"no space left on {where}"


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Create ``path`` (it must not exist) with ``data``, flushed to the disk; a failed write raises the OSError
    with its errno and removes the partial file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: a temporary file beside it, renamed into place. On any error
    the old file (if any) stays as it was and no temporary file is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    write_file(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
