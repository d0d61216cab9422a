"""Audio files and streams: saving what a job produced, and WAV to a pipe."""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # numpy is imported by whoever hands us arrays; `cosy say` defers it (~90 ms)
    import numpy as np

def format_for(path: Path) -> str:
    """The file format (a key of :data:`cosy.encode.FILE_FORMATS`) that ``path``'s extension names, if this
    installation can write it; else ValueError with the choices."""
    from cosy.encode import FILE_SUFFIXES, available_formats, why_unavailable

    name = FILE_SUFFIXES.get(Path(path).suffix.lower())
    if name is None:
        choices = ", ".join(sorted(FILE_SUFFIXES))
        raise ValueError(f"cannot write {Path(path).name!r}: the extension must be one of {choices}")
    if name not in available_formats():
        raise ValueError(f"cannot write {Path(path).name!r}: {name} {why_unavailable(name)}")
    return name


class AudioFileWriter:
    """A file written as the audio comes, complete or not at all.

    Samples go to a temporary file next to ``path`` (``.NAME.XXXX.part``) as they are written, encoded by
    :mod:`cosy.encode` (the gateways' encoders), so memory stays bounded whatever the length; ``commit()``
    finishes the container, fsyncs and renames it over ``path``; ``abort()`` (or leaving a ``with`` block on
    an exception) removes the temporary file. A failed write raises its OSError (``errno.ENOSPC`` on a full
    disk), never a library's assertion, and leaves no temporary file behind once aborted.
    """

    def __init__(self, path: Path, sample_rate: int) -> None:
        from cosy.encode import file_encoder

        self.path = Path(path)
        self.format = format_for(self.path)
        self.sample_rate = sample_rate
        self.samples = 0
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        self.tmp = Path(tmp)
        self._file: BinaryIO | None = None
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode open() would give it
            self._file = os.fdopen(fd, "w+b")
            self._encoder = file_encoder(self.format, sample_rate, self._file)
        except BaseException:
            self.abort()
            raise

    def write(self, pcm: bytes | np.ndarray) -> None:
        """Append int16 mono samples (s16le bytes, or an int16 array)."""
        import numpy as np

        samples = np.frombuffer(pcm, "<i2") if isinstance(pcm, (bytes, bytearray, memoryview)) else pcm
        assert self._file is not None, "the file was committed or aborted"
        data = self._encoder.encode(samples)
        if data:
            self._file.write(data)
        self.samples += len(samples)

    def commit(self) -> None:
        assert self._file is not None, "the file was committed or aborted"
        try:
            tail = self._encoder.finish()
            if tail:
                self._file.write(tail)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        close = getattr(getattr(self, "_encoder", None), "close", None)
        if close is not None and self._file is not None:
            close()  # before the file under it goes
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # closing flushes, which a full disk fails too
                pass
            self._file = None
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def __enter__(self) -> AudioFileWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


def write_atomic(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write a complete file or nothing: a temporary file in the same folder, then rename."""
    with AudioFileWriter(Path(path), sample_rate) as writer:
        writer.write(audio)
        writer.commit()


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
