"""Voices cloned over the network: uploads into the voice registry, and registry voices as a job's own prompt.

- :func:`decode_upload` turns an uploaded recording (any container libsndfile or FFmpeg reads: wav, flac,
  ogg, mp3, m4a, webm...) into mono float samples within given length limits; :class:`UploadError` says what is
  wrong with it. The voice upload (``POST /v1/audio/voices``) and the official ``/inference_*`` routes' prompt_wav
  both use it.
- :func:`resample_to_prompt` makes mono samples a job's own prompt (``JobSpec.prompt_audio``: 16 kHz mono
  s16le, PROTOCOL.md SUBMIT), low-passed (windowed sinc) so that downsampling does not alias.
- :func:`prompt_audio` gives a registry voice's reference as that prompt, resampled once per file version and kept.

A voice added through ``POST /v1/audio/voices`` is usable in the next request: the HTTP gateway sends it as the
job's prompt to a worker that clones (CosyVoice) until a worker serves it by name from its own folders.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from cosy import protocol as P
from cosy.voices import MAX_S, MIN_S, Voice

CLONING_ENGINES = ("cosyvoice",)  # engines whose workers announce READY clone


class UploadError(ValueError):
    """An upload that cannot become a voice or a prompt; ``code`` says why (:data:`UPLOAD_CODES`)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


UPLOAD_CODES = ("invalid_audio", "audio_too_short", "audio_too_long", "silent_audio")
SILENT = 1e-3  # peak below this: no voice to clone (as `cosy voices add` judges a reference)


def decode_upload(data: bytes, *, field: str = "audio_sample", min_s: float = MIN_S, max_s: float = MAX_S,
                  silent: float | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate (libsndfile, then PyAV/FFmpeg); UploadError when ``data`` is empty or
    does not decode, is outside ``min_s``-``max_s`` seconds, or (with ``silent``) peaks below that."""
    if not data:
        raise UploadError(f"{field} is empty", "invalid_audio")
    try:
        mono, rate = _decode(data)
    except Exception:
        raise UploadError(f"{field} is not audio that can be decoded (send wav, flac, ogg, mp3, m4a or webm)",
                          "invalid_audio") from None
    seconds = len(mono) / rate if rate else 0.0
    if not min_s <= seconds <= max_s:
        raise UploadError(f"{field} is {seconds:.2f} s long; it must be {min_s:g}-{max_s:g} s",
                          "audio_too_short" if seconds < min_s else "audio_too_long")
    if silent is not None and float(np.abs(mono).max(initial=0.0)) < silent:
        raise UploadError(f"{field} is silent", "silent_audio")
    return mono, rate


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    try:
        return _decode_sndfile(data)
    except Exception:
        return _decode_av(data)


def _decode_sndfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return (audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]), int(rate)


def _decode_av(data: bytes) -> tuple[np.ndarray, int]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        parts = [out.to_ndarray().reshape(-1) for frame in container.decode(stream)
                 for out in resampler.resample(frame)]
        parts += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        if not parts:
            raise ValueError("no audio frames")
        return np.concatenate(parts).astype(np.float32), int(stream.rate)


def lowpass(x: np.ndarray, rate: int, cutoff_hz: float, taps: int = 101) -> np.ndarray:
    """A windowed-sinc FIR low-pass (Hamming), so that downsampling does not alias."""
    fc = cutoff_hz / rate
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * fc * np.sinc(2 * fc * n) * np.hamming(taps)
    return np.convolve(x, (h / h.sum()).astype(np.float32), mode="same")


def resample_to_prompt(mono: np.ndarray, rate: int) -> bytes:
    """16 kHz s16le, within the protocol's prompt bounds (longer is cut at MAX_PROMPT_BYTES): low-passed at
    0.45 x 16 kHz before downsampling, linear interpolation between samples."""
    target = P.PROMPT_RATE
    x = np.asarray(mono, dtype=np.float32)
    if rate != target:
        if rate > target:
            x = lowpass(x, rate, 0.45 * target)
        n = int(round(len(x) * target / rate))
        x = np.interp(np.arange(n) * rate / target, np.arange(len(x)), x).astype(np.float32)
    pcm = np.clip(np.rint(x * 32767), -32768, 32767).astype("<i2").tobytes()
    return pcm[:P.MAX_PROMPT_BYTES]


def prompt_audio(voice: Voice) -> bytes:
    """The voice's reference as a job's prompt audio (cached per file and modification time)."""
    path = voice.audio_path
    return _prompt_cached(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _prompt_cached(path: str, _mtime_ns: int) -> bytes:
    return resample_to_prompt(*_decode(Path(path).read_bytes()))


def cloning_workers(workers: list[dict]) -> list[str]:
    """Names of the connected workers that clone (their READY said clone)."""
    return [str(w.get("name", "")) for w in workers if w.get("clone")]


def cannot_clone_message(workers: list[dict]) -> str:
    engines = sorted({str(w.get("engine")) for w in workers}) or ["none"]
    return (f"no connected worker clones voices (engines that can: {', '.join(CLONING_ENGINES)}; "
            f"serving now: {', '.join(engines)})")


def registry_voice(name: str, dirs: list[Path]) -> Voice | None:
    from cosy.voices import list_voices

    return next((v for v in list_voices(dirs) if v.name == name), None)
