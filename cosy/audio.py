"""Audio files and streams: saving what a job produced, and WAV to a pipe."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # numpy is imported by whoever hands us arrays; `cosy say` defers it (~90 ms)
    import numpy as np

FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG"}


def format_for(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write {path.name!r}: use one of {', '.join(sorted(FORMATS))}")
    return fmt


def write_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write a complete file or nothing: a temporary file in the same folder, then rename."""
    import soundfile as sf

    path = Path(path)
    fmt = format_for(path)
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as f:
            sf.write(f, audio, sample_rate, format=fmt, subtype=subtype)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def wav_stream_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """A WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as ffmpeg and sox accept)."""
    byte_rate = sample_rate * channels * bits // 8
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, byte_rate, block, bits)
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


class PcmSink:
    """Writes audio to a pipe as it arrives: streamed WAV or raw s16le."""

    def __init__(self, out: BinaryIO, raw: bool = False) -> None:
        self.out = out
        self.raw = raw
        self.started = False

    def write(self, data: bytes, sample_rate: int) -> None:
        """Write s16le samples (bytes or any buffer of them: no numpy needed)."""
        if not self.started:
            if not self.raw:
                self.out.write(wav_stream_header(sample_rate))
            self.started = True
        self.out.write(data)
        self.out.flush()
