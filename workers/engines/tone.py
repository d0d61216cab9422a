"""A test and benchmark engine: a sine tone with controlled timing. Only used when named.

Options (``--option key=value``): ``delay_ms`` before each chunk, ``chunk_ms``
(audio per chunk), ``ms_per_char`` (audio length per character of text),
``voices`` (comma list), ``voices_file`` (a file with a comma list, read again on
refresh, as zero-shot engines re-read their voice folders), ``capacity``,
``sample_rate``, ``frequency``.
Failure injection for tests: a text containing ``fail_on`` raises an engine
error; one containing ``oom_on`` raises what PyTorch raises on CUDA out-of-memory;
one containing ``crash_on`` kills the process after ``crash_after`` chunks (as a
segfault or the OOM killer would); one containing ``hang_on`` stops after ``crash_after``
chunks and never returns, deaf to cancellation (as CosyVoice's stream does when its LLM
thread dies).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import numpy as np

from .base import EngineError, SynthesisRequest, VoiceInfo


class ToneEngine:
    name = "tone"

    def __init__(self, delay_ms: float | str = 0, chunk_ms: float | str = 100, ms_per_char: float | str = 20,
                 voices: str = "tone", capacity: int | str = 4, sample_rate: int | str = 22050,
                 frequency: float | str = 440.0, fail_on: str = "", crash_on: str = "",
                 crash_after: int | str = 1, first_delay_ms: float | str | None = None, oom_on: str = "",
                 voices_file: str = "", hang_on: str = "") -> None:
        self.model = "sine"
        self.device = "cpu"
        self.sample_rate = int(sample_rate)
        self.capacity = int(capacity)
        self._delay = float(delay_ms) / 1000
        self._first_delay = self._delay if first_delay_ms is None else float(first_delay_ms) / 1000
        self._chunk = max(1, int(self.sample_rate * float(chunk_ms) / 1000))
        self._per_char = float(ms_per_char) / 1000
        self._voices_file = voices_file
        self._names = self._read_voices() if voices_file else [v for v in voices.split(",") if v]
        self._freq = float(frequency)
        self._fail_on = fail_on
        self._crash_on = crash_on
        self._oom_on = oom_on
        self._crash_after = int(crash_after)
        self._hang_on = hang_on

    def _read_voices(self) -> list[str]:
        with open(self._voices_file) as f:
            return [v.strip() for v in f.read().split(",") if v.strip()]

    def refresh_voices(self) -> bool:
        if not self._voices_file:
            return False
        names = self._read_voices()
        changed = names != self._names
        self._names = names
        return changed

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(n, description="test tone") for n in self._names]

    @property
    def default_voice(self) -> str:
        return self._names[0]

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        if self._fail_on and self._fail_on in request.text:
            raise EngineError("injected failure (fail_on)", retryable=False)
        if self._oom_on and self._oom_on in request.text:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the tone engine)")
        total = max(1, int(len(request.text) * self._per_char * self.sample_rate / request.speed))
        t = np.arange(total, dtype=np.float32) / self.sample_rate
        wave = (0.3 * 32767 * np.sin(2 * np.pi * self._freq * t)).astype(np.int16)
        crash = bool(self._crash_on) and self._crash_on in request.text
        hang = bool(self._hang_on) and self._hang_on in request.text
        for i, start in enumerate(range(0, total, self._chunk)):
            if crash and i >= self._crash_after:
                os._exit(137)
            if hang and i >= self._crash_after:
                threading.Event().wait()  # forever
            delay = self._first_delay if i == 0 else self._delay
            if delay:
                if request.cancelled.wait(delay):
                    return
            elif request.cancelled.is_set():
                return
            yield wave[start:start + self._chunk]

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


