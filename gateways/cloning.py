"""Voices cloned over the network: uploads into the voice registry, and registry voices as a job's own prompt.

- :func:`decode_upload` turns an uploaded recording (any container libsndfile or FFmpeg reads: wav, flac,
  ogg, mp3, m4a, webm...) into mono float samples; :class:`UploadError` says what is wrong with it.
- :func:`prompt_audio` gives a registry voice's reference as the job's own prompt (``JobSpec.prompt_audio``:
  16 kHz mono s16le, PROTOCOL.md SUBMIT), resampled once per file version and kept.

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
    """An upload that cannot become a voice; ``code`` is the API's error code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def decode_upload(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate; UploadError when it does not decode or is too short or too long."""
    if not data:
        raise UploadError("audio_sample is empty", "invalid_audio")
    try:
        mono, rate = _decode_sndfile(data)
    except Exception:
        try:
            mono, rate = _decode_av(data)
        except Exception:
            raise UploadError("audio_sample does not decode as audio (send wav, flac, ogg, mp3, m4a or webm)",
                              "invalid_audio") from None
    seconds = len(mono) / rate if rate else 0.0
    if seconds < MIN_S:
        raise UploadError(f"audio_sample is {seconds:.1f} s long; a voice needs {MIN_S:g}-{MAX_S:g} s",
                          "audio_too_short")
    if seconds > MAX_S:
        raise UploadError(f"audio_sample is {seconds:.1f} s long; a voice needs {MIN_S:g}-{MAX_S:g} s",
                          "audio_too_long")
    return mono, rate


def _decode_sndfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio.mean(axis=1), int(rate)


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


def resample_to_prompt(mono: np.ndarray, rate: int) -> bytes:
    """16 kHz s16le, within the protocol's prompt bounds (longer is cut at MAX_PROMPT_BYTES)."""
    target = P.PROMPT_RATE
    x = np.asarray(mono, dtype=np.float32)
    if rate != target:
        if rate > target:  # a short moving-average low-pass before decimating, against the worst aliasing
            width = max(1, round(rate / target))
            x = np.convolve(x, np.ones(width, dtype=np.float32) / width, mode="same")
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
    import soundfile as sf

    audio, rate = sf.read(path, dtype="float32", always_2d=True)
    return resample_to_prompt(audio.mean(axis=1), int(rate))


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
