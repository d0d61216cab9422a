"""Audio containers, one module for every way out: the gateways' streams and the CLI's files.

Streams (:func:`make_encoder`): bytes out as soon as samples come in.

- ``wav``: a RIFF header with unknown sizes (0xFFFFFFFF, as ffmpeg and sox write to a pipe),
  then raw samples; the voice's native rate.
- ``pcm``: raw signed 16-bit little-endian mono, no header, at 24 kHz like OpenAI's API
  (resampled when the voice's rate differs); the rate is also sent in ``X-Sample-Rate``.
- ``flac``, ``mp3``, ``opus`` (Ogg Opus): libsndfile through soundfile, writing into a
  sink that hands out each new byte once. What libsndfile rewrites at close (FLAC's total
  sample count and MD5, LAME's Xing frame) is dropped: those fields then say "unknown", which
  decoders accept for a stream. MP3 is constant bit rate, so its length estimate is right
  without the Xing frame. Ogg pages come out about once a second, so ``opus`` streams in
  steps of about a second.
- ``aac``: AAC-LC in ADTS frames (what OpenAI sends for ``aac``), encoded by FFmpeg through PyAV
  (the ``av`` package); each frame of 1024 samples leaves as soon as it is encoded. Decoders
  see the encoder's priming (1024 samples) and padding of the last frame: up to ~2048 samples
  more than were sent.

Files (:func:`file_encoder`, used by :class:`cosy.audio.AudioFileWriter`): the same encoders writing into a
real, seekable file, so libsndfile patches what it writes at close (WAV and FLAC lengths, MP3's Xing frame)
and the file is exact. ``ogg`` (Ogg Vorbis) is a file format only; the OpenAI formats are
:data:`RESPONSE_FORMATS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np

from cosy.audio import wav_stream_header

OPENAI_PCM_RATE = 24_000
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


AAC_BIT_RATE = 64_000  # mono speech


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    sndfile: tuple[str, str] | None = None  # (format, subtype) for libsndfile
    av: str | None = None  # FFmpeg's encoder, through PyAV


FORMATS: dict[str, AudioFormat] = {
    "wav": AudioFormat("wav", "audio/wav", ("WAV", "PCM_16")),  # streams: WavEncoder; files: libsndfile
    "pcm": AudioFormat("pcm", "audio/pcm"),
    "flac": AudioFormat("flac", "audio/flac", ("FLAC", "PCM_16")),
    "mp3": AudioFormat("mp3", "audio/mpeg", ("MP3", "MPEG_LAYER_III")),
    "opus": AudioFormat("opus", "audio/ogg; codecs=opus", ("OGG", "OPUS")),
    "aac": AudioFormat("aac", "audio/aac", av="aac"),
    "ogg": AudioFormat("ogg", "audio/ogg; codecs=vorbis", ("OGG", "VORBIS")),
}
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")  # OpenAI's response_format values
FILE_FORMATS = ("wav", "flac", "ogg", "opus", "mp3", "aac")  # what `cosy say --out` and `cosy batch` write
FILE_SUFFIXES = {".wav": "wav", ".flac": "flac", ".ogg": "ogg", ".oga": "ogg", ".opus": "opus", ".mp3": "mp3",
                 ".aac": "aac"}


def _av_has(codec: str) -> bool:
    try:
        import av
    except ImportError:
        return False
    return codec in av.codecs_available


def available_formats() -> list[str]:
    """The formats this installation can encode (mp3 and opus need libsndfile >= 1.1 / 1.0.29, aac PyAV)."""
    import soundfile as sf

    out = []
    for name, fmt in FORMATS.items():
        if fmt.av is not None:
            if _av_has(fmt.av):
                out.append(name)
            continue
        if fmt.sndfile is None:
            out.append(name)
            continue
        major, subtype = fmt.sndfile
        if major in sf.available_formats() and subtype in sf.available_subtypes(major):
            out.append(name)
    return out


class StreamEncoder(Protocol):
    content_type: str
    sample_rate: int  # of the output

    def encode(self, pcm: np.ndarray) -> bytes:
        """Encode int16 mono samples; the first call's bytes start with the container header."""
        ...

    def finish(self) -> bytes:
        """The container's trailing bytes."""
        ...


class LinearResampler:
    """Streaming linear-interpolation resampler, continuous across chunks (int16 in and out).

    Good enough for speech between close rates (22.05 kHz -> 24 kHz); it does not low-pass, so
    downsampling by much aliases.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.step = src_rate / dst_rate
        self.pos = 0.0  # position of the next output sample, in input samples from `tail`
        self.tail: np.ndarray | None = None

    def process(self, pcm: np.ndarray) -> np.ndarray:
        x = pcm.astype(np.float32)
        buf = x if self.tail is None else np.concatenate([self.tail, x])
        last = len(buf) - 1
        if last < 1:
            self.tail = buf if len(buf) else self.tail
            return np.zeros(0, np.int16)
        if self.pos > last:
            self.pos -= last
            self.tail = buf[-1:]
            return np.zeros(0, np.int16)
        count = math.floor((last - self.pos) / self.step) + 1
        where = self.pos + self.step * np.arange(count)
        out = np.interp(where, np.arange(len(buf)), buf)
        self.pos = self.pos + self.step * count - last
        self.tail = buf[-1:]
        return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


class WavEncoder:
    content_type = "audio/wav"

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._started = False

    def encode(self, pcm: np.ndarray) -> bytes:
        data = pcm.astype("<i2", copy=False).tobytes()
        if not self._started:
            self._started = True
            return wav_stream_header(self.sample_rate) + data
        return data

    def finish(self) -> bytes:
        return b"" if self._started else wav_stream_header(self.sample_rate)


class PcmEncoder:
    content_type = "audio/pcm"

    def __init__(self, sample_rate: int, out_rate: int | None = OPENAI_PCM_RATE) -> None:
        self.sample_rate = out_rate or sample_rate
        self._resampler = LinearResampler(sample_rate, self.sample_rate) if self.sample_rate != sample_rate else None

    def encode(self, pcm: np.ndarray) -> bytes:
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        return pcm.astype("<i2", copy=False).tobytes()

    def finish(self) -> bytes:
        return b""


class ForwardSink:
    """A write-only 'file' for libsndfile that hands out every new byte exactly once.

    libsndfile seeks back at close to patch headers; bytes written below what was already
    handed out are dropped (counted in ``dropped``), so what the client got stays valid.
    """

    def __init__(self) -> None:
        self.pos = 0
        self.size = 0
        self.sent = 0
        self.dropped = 0
        self._pending = bytearray()

    def write(self, data: bytes) -> int:
        b = bytes(data)
        end = self.pos + len(b)
        skip = max(0, self.sent - self.pos)
        if skip < len(b):
            offset = self.pos + skip - self.sent
            if offset > len(self._pending):
                self._pending.extend(b"\0" * (offset - len(self._pending)))
            self._pending[offset:offset + len(b) - skip] = b[skip:]
        self.dropped += min(skip, len(b))
        self.pos = end
        self.size = max(self.size, end)
        return len(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        out = bytes(self._pending)
        self.sent += len(out)
        self._pending.clear()
        return out


def why_unavailable(name: str) -> str:
    """Why format ``name`` (a key of FORMATS) cannot be encoded here, for an error message."""
    fmt = FORMATS[name]
    if fmt.av is not None:
        return "needs PyAV (pip install 'cosy-tts[http]' or pip install av)"
    return "is not supported by this installation's libsndfile"


class SndfileEncoder:
    """libsndfile through soundfile: into a :class:`ForwardSink` (a stream), or into ``file``, a real
    seekable file whose header libsndfile patches at close (then ``encode`` and ``finish`` return b"")."""

    def __init__(self, fmt: AudioFormat, sample_rate: int, file: BinaryIO | None = None) -> None:
        import soundfile as sf

        assert fmt.sndfile is not None
        major, subtype = fmt.sndfile
        self.content_type = fmt.content_type
        self.sample_rate = sample_rate
        self._resampler: LinearResampler | None = None
        if subtype == "OPUS" and sample_rate not in OPUS_RATES:
            self.sample_rate = next((r for r in OPUS_RATES if r >= sample_rate), OPUS_RATES[-1])
            self._resampler = LinearResampler(sample_rate, self.sample_rate)
        extra = {"bitrate_mode": "CONSTANT", "compression_level": 0.5} if major == "MP3" else {}
        self._sink = ForwardSink() if file is None else None
        self._target = _ErrorKeepingFile(file if file is not None else self._sink)
        self._file = sf.SoundFile(self._target, mode="w", samplerate=self.sample_rate, channels=1,
                                  format=major, subtype=subtype, **extra)

    def _take(self) -> bytes:
        return self._sink.take() if self._sink is not None else b""

    def encode(self, pcm: np.ndarray) -> bytes:
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        if len(pcm):
            with self._target.raising():
                self._file.write(pcm.astype(np.int16, copy=False))
        return self._take()

    def finish(self) -> bytes:
        with self._target.raising():
            self._file.close()
        return self._take()

    def close(self) -> None:
        """Give up (a file being aborted): release libsndfile's handle, ignoring what its last writes say."""
        with suppress(Exception):
            self._file.close()


class _ErrorKeepingFile:
    """A file for libsndfile's virtual I/O that keeps the first OSError of a write instead of raising it.

    soundfile calls these methods from C callbacks, where an exception is printed and lost: a full disk then
    surfaces as soundfile's ``AssertionError`` about a short write. Kept here, the OSError (errno ENOSPC and
    all) is what :meth:`raising` raises once libsndfile returns.
    """

    def __init__(self, file: object) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        if self.error is not None:
            return 0
        try:
            self._file.write(data)  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under libsndfile
            self.error = exc if isinstance(exc, OSError) else OSError(str(exc))
            return 0
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        try:
            return self._file.seek(offset, whence)  # type: ignore[attr-defined]
        except (OSError, ValueError) as exc:
            self.error = self.error or (exc if isinstance(exc, OSError) else OSError(str(exc)))
            return -1

    def tell(self) -> int:
        try:
            return self._file.tell()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            return -1

    def read(self, size: int = -1) -> bytes:
        try:
            return self._file.read(size)  # type: ignore[attr-defined]
        except (OSError, ValueError):
            return b""

    @contextmanager
    def raising(self) -> Iterator[None]:
        try:
            yield
        except Exception:
            if self.error is not None:
                raise self.error from None
            raise
        if self.error is not None:
            raise self.error


class _Bytes:
    """A write-only file for PyAV's muxer: what it writes is taken out once."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class AdtsAacEncoder:
    """AAC-LC in ADTS frames through PyAV (FFmpeg's native aac encoder), at the voice's rate."""

    content_type = "audio/aac"

    def __init__(self, sample_rate: int, bit_rate: int = AAC_BIT_RATE) -> None:
        import av

        self._av = av
        self.sample_rate = sample_rate
        self._sink = _Bytes()
        self._container = av.open(self._sink, "w", format="adts")
        self._stream = self._container.add_stream("aac", rate=sample_rate, layout="mono")
        self._stream.bit_rate = bit_rate
        self._pts = 0

    def _mux(self, frame: object) -> bytes:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def encode(self, pcm: np.ndarray) -> bytes:
        if not len(pcm):
            return b""
        frame = self._av.AudioFrame.from_ndarray(pcm.astype(np.int16, copy=False).reshape(1, -1), format="s16",
                                                 layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(pcm)
        return self._mux(frame)

    def finish(self) -> bytes:
        out = self._mux(None)
        self._container.close()
        return out + self._sink.take()


def file_encoder(name: str, sample_rate: int, file: BinaryIO) -> StreamEncoder:
    """An encoder for format ``name`` (one of FILE_FORMATS) that writes into ``file`` (seekable, binary).

    What ``encode`` and ``finish`` return still has to be written to ``file`` (AAC's frames); libsndfile's
    formats write through themselves and return b"". A failed write raises its OSError (ENOSPC included).
    """
    if name == "aac":
        return AdtsAacEncoder(sample_rate)
    return SndfileEncoder(FORMATS[name], sample_rate, file)


def make_encoder(name: str, sample_rate: int, pcm_rate: int | None = OPENAI_PCM_RATE) -> StreamEncoder:
    """An encoder for format ``name`` (a key of FORMATS) fed with int16 mono at ``sample_rate``."""
    if name == "wav":
        return WavEncoder(sample_rate)
    if name == "pcm":
        return PcmEncoder(sample_rate, pcm_rate)
    if name == "aac":
        return AdtsAacEncoder(sample_rate)
    return SndfileEncoder(FORMATS[name], sample_rate)
