"""The engine interface (see ARCHITECTURE.md): what the worker asks of every speech engine.

Two shapes of engine fit it:

* a *batched* engine (CosyVoice with cosy's pipeline) serves many jobs from one loop of its own: the worker
  hands it a job and a sink with ``start(request, sink)`` and it delivers the audio from its own threads;
* a *simple* engine (Piper, the tone test engine) is one blocking generator per job
  (``Synthesizer.synthesize``); ``ThreadedEngine`` runs it on a pool of ``capacity`` threads and is the
  ``Engine`` the worker sees (``load_engine`` wraps it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

log = logging.getLogger("cosy.engine")


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language: str = ""
    description: str = ""


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str
    speed: float = 1.0
    job: str = ""
    instruct: str = ""  # for instruct-capable engines; others ignore it
    run: str = ""  # the broker's run id: what ``Engine.cancel`` names
    seed: int | None = None  # sampling seed for engines that sample (None: derived from the job id)
    # The job's own reference voice (engines with ``clone = True``): 16 kHz mono s16le PCM, and its transcript
    # (zero-shot) or none (cross-lingual).
    prompt_audio: bytes = field(default=b"", repr=False)
    prompt_text: str = ""
    # Set when the broker cancels the run: engines stop between chunks.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


class EngineError(RuntimeError):
    """A synthesis failed. ``retryable`` says whether another worker may succeed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class Sink(Protocol):
    """Where an engine delivers one job. Calls for one job come one at a time (from any engine thread):
    ``audio`` zero or more times, then exactly one of ``done`` or ``failed``. After ``Engine.cancel`` the
    engine may stop calling the sink at all."""

    def audio(self, pcm: np.ndarray) -> None:
        """Mono audio as it is produced: int16 or float32 at the engine's ``sample_rate``."""
        ...

    def done(self) -> None: ...

    def failed(self, error: BaseException) -> None:
        """``EngineError`` (with its ``retryable``) or any exception an engine bug raised."""
        ...


class _Described(Protocol):
    name: str
    model: str
    sample_rate: int
    device: str
    # How many jobs the engine runs at once (what the worker announces to the broker).
    capacity: int

    def voices(self) -> list[VoiceInfo]: ...

    @property
    def default_voice(self) -> str: ...

    def metrics(self) -> dict[str, Any]:
        """Device figures for heartbeats (GPU memory, utilisation...); may be empty."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Engine(_Described, Protocol):
    """What the worker drives. ``start`` returns at once; the worker's socket loop never waits on the engine."""

    def start(self, request: SynthesisRequest, sink: Sink) -> None: ...

    def cancel(self, run: str) -> None:
        """Stop the run's work at the engine's next step and free its state."""
        ...


@runtime_checkable
class Synthesizer(_Described, Protocol):
    """A simple engine: one blocking generator per job."""

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """Yield mono audio as it is produced: int16 or float32 arrays at ``sample_rate``."""
        ...


class RefreshableVoices(Protocol):
    """Optional: engines whose voices can change while they run (zero-shot voices from folders).
    Called from the worker's socket loop, so it must never wait on synthesis."""

    def refresh_voices(self) -> bool:
        """Re-read the voices; True when the set changed."""
        ...


class ThreadedEngine:
    """A ``Synthesizer`` as an ``Engine``: each job's generator runs on one of ``capacity`` threads."""

    def __init__(self, synth: Synthesizer) -> None:
        self.synth = synth
        self._pool = ThreadPoolExecutor(max_workers=max(1, int(synth.capacity)), thread_name_prefix="synth")
        self._running: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # name, model, sample_rate, voices(), refresh_voices()...
        return getattr(self.synth, name)

    @property
    def default_voice(self) -> str:
        return self.synth.default_voice

    def start(self, request: SynthesisRequest, sink: Sink) -> None:
        with self._lock:
            self._running[request.run] = request.cancelled
        self._pool.submit(self._run, request, sink)

    def cancel(self, run: str) -> None:
        with self._lock:
            cancelled = self._running.get(run)
        if cancelled is not None:
            cancelled.set()

    def _run(self, request: SynthesisRequest, sink: Sink) -> None:
        try:
            for audio in self.synth.synthesize(request):
                if request.cancelled.is_set():
                    return
                sink.audio(audio)
            if not request.cancelled.is_set():
                sink.done()
        except BaseException as exc:  # noqa: BLE001 - an engine bug must not take the worker down
            sink.failed(exc)
        finally:
            with self._lock:
                self._running.pop(request.run, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.synth.close()


def as_engine(engine: Engine | Synthesizer) -> Engine:
    """The engine itself if it has ``start``/``cancel``, else the threaded adapter around its generator."""
    if hasattr(engine, "start") and hasattr(engine, "cancel"):
        return engine  # type: ignore[return-value]
    return ThreadedEngine(engine)  # type: ignore[arg-type,return-value]


class CollectingSink:
    """A sink that keeps a job's audio and lets a caller wait for its end (warm-up, tests, benchmarks)."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def audio(self, pcm: np.ndarray) -> None:
        self.chunks.append(np.array(pcm, copy=True))

    def done(self) -> None:
        self.finished.set()

    def failed(self, error: BaseException) -> None:
        self.error = error
        self.finished.set()

    def wait(self, timeout: float | None = None) -> list[np.ndarray]:
        """The chunks once the job ended; raises the job's error, or TimeoutError."""
        if not self.finished.wait(timeout):
            raise TimeoutError(f"the job did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.chunks


class QueueSink:
    """A sink read as a blocking iterator of chunks (``CosyVoiceEngine.synthesize``); re-raises the job's error."""

    _END = object()

    def __init__(self) -> None:
        import queue

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.finished = False

    def audio(self, pcm: np.ndarray) -> None:
        self._queue.put(pcm)

    def done(self) -> None:
        self._queue.put(self._END)

    def failed(self, error: BaseException) -> None:
        self._queue.put(error)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if item is self._END:
                self.finished = True
                return
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            yield item
