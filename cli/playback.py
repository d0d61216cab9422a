"""Live playback through sounddevice with a small jitter buffer.

Playback starts with the first chunk. The PortAudio callback pulls from a queue of
chunks; when the queue runs dry before the job is finished (an underrun) it plays
silence and counts it, and resumes as soon as audio arrives.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class NoAudioDevice(RuntimeError):
    """No usable audio output: the message says why, in one line."""


def _sounddevice() -> Any:
    try:
        import sounddevice as sd
    except OSError:
        raise NoAudioDevice("no audio output: the PortAudio library is missing "
                            "(Debian/Ubuntu: apt install libportaudio2)") from None
    return sd


def check_output_device() -> str:
    sd = _sounddevice()
    try:
        dev = sd.query_devices(kind="output")
    except Exception:
        raise NoAudioDevice("no audio output device found (no sound server or sound card)") from None
    return str(dev["name"])


# PortAudio's output latency. Its "low" (about 10 ms through ALSA's PulseAudio plugin) underruns in ALSA
# whenever the callback thread waits more than that for a core, and ALSA's recovery drops what was buffered:
# on a 2-core machine with the load average at 10 (cosy's own workers rendering, say), `cosy say` lost
# audio 3 times in 3; with 100 ms, 0 in 3 (tests/test_playback.py). The first chunk still sounds at once
# (the stream starts with it); only the margin against a late callback grows.
OUTPUT_LATENCY_S = 0.1


class LivePlayer:
    """Plays s16le mono chunks (bytes, or any buffer of int16 such as a numpy array) as they are fed.

    Works on bytes throughout, so `cosy say` needs no numpy to play: the callback copies memoryview
    slices into PortAudio's buffer. ``played`` and ``underruns`` count samples and callbacks.
    """

    def __init__(self, sample_rate: int, prebuffer_ms: float = 0.0, device: str | int | None = None) -> None:
        sd = _sounddevice()
        self.sample_rate = sample_rate
        self.prebuffer = int(sample_rate * prebuffer_ms / 1000) * 2  # bytes
        self._queue: deque[memoryview] = deque()
        self._offset = 0  # bytes of the head chunk already played
        self._buffered = 0  # bytes queued
        self._lock = threading.Lock()
        self._finished = False
        self._drained = threading.Event()
        self._end_dac: float | None = None  # when the last sample reaches the DAC, on the stream's clock
        self._sleep_on_drain = False
        self._started = self.prebuffer == 0
        self.underruns = 0
        self.played = 0  # samples
        try:
            self._stream = sd.RawOutputStream(samplerate=sample_rate, channels=1, dtype="int16",
                                              device=device, callback=self._callback,
                                              latency=OUTPUT_LATENCY_S)
            self._stream.start()
        except Exception as exc:
            raise NoAudioDevice(f"cannot open the audio output: {str(exc).splitlines()[0]}") from None

    def feed(self, pcm: Any) -> None:
        data = memoryview(pcm).cast("B")
        if len(data) % 2:
            raise ValueError("s16le audio has an even number of bytes")
        with self._lock:
            self._queue.append(data)
            self._buffered += len(data)
            if not self._started and self._buffered >= self.prebuffer:
                self._started = True

    @property
    def buffered_s(self) -> float:
        """Seconds of audio fed and not yet played."""
        with self._lock:
            return self._buffered / 2 / self.sample_rate

    def restart(self) -> None:
        """A new attempt replaces the old one: drop what is still queued of the old."""
        with self._lock:
            self._queue.clear()
            self._offset = 0
            self._buffered = 0

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._started = True

    def _callback(self, outdata: Any, frames: int, time_info: Any, _status: Any) -> None:
        out = memoryview(outdata).cast("B")
        need = frames * 2
        filled = 0
        with self._lock:
            while self._started and filled < need and self._queue:
                head = self._queue[0]
                take = min(need - filled, len(head) - self._offset)
                out[filled:filled + take] = head[self._offset:self._offset + take]
                filled += take
                self._offset += take
                self._buffered -= take
                if self._offset >= len(head):
                    self._queue.popleft()
                    self._offset = 0
            finished = self._finished and not self._queue
            if filled < need and self._started and not finished and self.played:
                self.underruns += 1
            self.played += filled // 2
        if filled < need:
            out[filled:need] = bytes(need - filled)
        if finished and not self._drained.is_set():
            # Handed to PortAudio is not played: the buffer (OUTPUT_LATENCY_S) still holds the end. Drained
            # once the stream's clock passes the time the last sample reaches the DAC.
            dac = float(time_info.outputBufferDacTime)
            if self._end_dac is None:
                self._end_dac = dac + filled // 2 / self.sample_rate
            if dac <= 0.0:  # this host API gives no timing: wait out the stream's latency instead
                self._sleep_on_drain = True
                self._drained.set()
            elif float(time_info.currentTime) >= self._end_dac:
                self._drained.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything fed has been played (not just handed to the device)."""
        ok = self._drained.wait(timeout)
        if ok and self._sleep_on_drain:
            import time

            time.sleep(float(self._stream.latency))
        return ok

    def close(self) -> None:
        try:
            self._stream.stop()
            self._stream.close()
        except Exception:
            pass
