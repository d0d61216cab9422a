"""One request's audio from the broker, for every gateway (HTTP, Wyoming, gRPC): the streaming logic once.

API
---
``stream = await open_stream(bridge, spec, timeout_s=60, split=False, metrics=None, api="")``
    Checks the broker, then submits ``spec`` (a :class:`cosy.client.JobSpec`). With ``split`` and two or
    more workers connected, a text of several sentences goes as sentence jobs across the workers
    (:mod:`cosy.gateways.segments`, over :mod:`cosy.segments`) and streams back as one. Raises
    :class:`JobError` with code ``BROKER_UNREACHABLE`` (no status reply), ``NO_WORKERS`` (none connected) or
    ``SHUTTING_DOWN`` (the gateway is stopping). Nothing is submitted when it raises.

``rate = await stream.start(disconnected=None)``
    Waits for the first audio and returns its sample rate (constant for the whole stream). Everything that
    ends the job before that raises :class:`JobError`, whose ``code`` is the broker's (PROTOCOL.md
    "Errors": ``UNKNOWN_VOICE``, ``BUSY``, ``CANNOT_CLONE``, ``ENGINE_ERROR``, ``WORKER_LOST``...) or one of
    this module's: ``TIMEOUT`` (no audio within ``timeout_s``), ``NO_AUDIO`` (the job ended with none),
    ``CLIENT_CLOSED`` (``await disconnected()`` returned true; it is polled every 0.5 s), ``GATEWAY_STOPPED``.
    ``voices`` lists the served voices when the broker sent them (UNKNOWN_VOICE, CANNOT_CLONE). On any error,
    and on cancellation of the waiting task, the job is cancelled before the exception leaves.

``async with contextlib.aclosing(stream.audio()) as chunks: async for pcm in chunks: ...``
    The audio as s16le mono bytes at ``rate``, the first chunk first, each as it arrives; it ends only when the
    job is complete and every sample was yielded (audio the live events missed is yielded at the end). What
    cannot be completed after the first audio raises :class:`StreamAborted` (a :class:`JobError`, with
    ``samples_sent``): a new attempt that would restart the audio (``RESTARTED``), a failure
    (the broker's code), no chunk for ``timeout_s`` (``TIMEOUT``), more samples sent than the job has
    (``INCOMPLETE_AUDIO``). A gateway must turn it into a visible error (HTTP: cut the response without its
    final chunk; Wyoming: audio-stop then an error event; gRPC: an error status), never a short success.

``stream.totals``
    After ``audio()`` ended: :class:`StreamTotals` (``samples``, ``sample_rate``, ``seconds``, ``input_chars``,
    ``done`` = the broker's DONE, and ``usage()`` = OpenAI's ``{input_tokens, output_tokens, total_tokens}``).
    ``None`` before.

``stream.cancel() -> bool``
    The one way to stop the job (one job or all its sentence jobs). Call it in a ``finally`` when done with the
    stream, whatever happened: it does nothing after the job ended, and returns True only when it stopped a
    live job, i.e. the gateway's client went away (count a disconnect).

``stream.job`` is the job id (``X-Cosy-Job``); ``stream.sample_rate`` the rate once started (0 before);
``stream.samples_sent`` the samples yielded so far. With ``metrics`` (a
:class:`cosy.metrics.GatewayMetrics`) and ``api``, the stream records the time to first audio (from
``open_stream``, or the ``t0`` given to it), the active streams while ``audio()`` runs, the audio seconds and the
job's ttfc/rtf at completion; request counts and disconnects stay the gateway's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from cosy import protocol as P
from cosy.client import Audio, BrokerRestarted, Completed, Failed, JobSpec, Rejected
from cosy.gateways.bridge import GATEWAY_STOPPED, BrokerBridge, GatewayError, JobEvents
from cosy.gateways.segments import start_segmented
from cosy.metrics import GatewayMetrics
from cosy.segments import TextTooLong, split_text

log = logging.getLogger("cosy.gateway")

# The gateway's own error codes (the others are the broker's, PROTOCOL.md "Errors").
BROKER_UNREACHABLE = "BROKER_UNREACHABLE"
NO_WORKERS = "NO_WORKERS"
TIMEOUT = "TIMEOUT"
NO_AUDIO = "NO_AUDIO"
CLIENT_CLOSED = "CLIENT_CLOSED"
RESTARTED = "RESTARTED"
INCOMPLETE_AUDIO = "INCOMPLETE_AUDIO"
__all__ = ["GATEWAY_STOPPED", "JobError", "JobStream", "StreamAborted", "StreamTotals", "open_stream"]

DISCONNECT_POLL_S = 0.5
# OpenAI's usage counts tokens; cosy counts what it has: characters in, audio out in 40 ms steps (25 per second,
# the speech-token rate of CosyVoice 2 and 3, so for those engines it is the number of speech tokens made).
OUTPUT_TOKENS_PER_S = 25


class JobError(Exception):
    """The job gave no audio (raised by open_stream/start) or could not finish it (StreamAborted)."""

    def __init__(self, code: str, message: str, voices: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.voices = list(voices or [])


class StreamAborted(JobError):
    """The audio already sent cannot be completed: the gateway must end its reply as an error."""

    def __init__(self, code: str, message: str, samples_sent: int) -> None:
        super().__init__(code, message)
        self.samples_sent = samples_sent


@dataclass(frozen=True)
class StreamTotals:
    samples: int
    sample_rate: int
    input_chars: int  # of the text and the instructions
    done: P.JobDone

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    def usage(self) -> dict[str, int]:
        """OpenAI's ``usage``: input_tokens = characters of input and instructions, output_tokens = audio length
        in 40 ms units (25 a second), total_tokens their sum."""
        out = round(self.seconds * OUTPUT_TOKENS_PER_S)
        return {"input_tokens": self.input_chars, "output_tokens": out, "total_tokens": self.input_chars + out}


async def open_stream(bridge: BrokerBridge, spec: JobSpec, *, timeout_s: float, split: bool = False,
                      metrics: GatewayMetrics | None = None, api: str = "", t0: float | None = None) -> JobStream:
    """Check the broker and submit ``spec`` (as sentence jobs across the workers with ``split``); see above."""
    t0 = time.monotonic() if t0 is None else t0
    try:
        snap = await bridge.status()
    except GatewayError as exc:
        raise JobError(P.SHUTTING_DOWN if exc.code == GATEWAY_STOPPED else BROKER_UNREACHABLE, str(exc)) from None
    if not snap.workers:
        raise JobError(NO_WORKERS, "no workers are connected to the broker")
    try:
        parts = split_text(spec.text) if split and len(snap.workers) > 1 else []
    except TextTooLong:  # a run that no job can take: the broker says so for the whole text
        parts = []
    try:
        if len(parts) > 1:
            source: JobEvents = start_segmented(spec, parts, bridge.submit, len(snap.workers))
        else:
            source = bridge.submit(spec)
    except GatewayError as exc:
        raise JobError(P.SHUTTING_DOWN, str(exc)) from None
    return JobStream(source, timeout_s, len(spec.text) + len(spec.instruct), metrics, api, t0)


class JobStream:
    """One request's job (or its sentence jobs) from submission to the last sample. See the module's API."""

    def __init__(self, source: JobEvents, timeout_s: float, input_chars: int,
                 metrics: GatewayMetrics | None = None, api: str = "", t0: float | None = None) -> None:
        self._source = source
        self.timeout_s = timeout_s
        self.input_chars = input_chars
        self.metrics = metrics
        self.api = api
        self.t0 = time.monotonic() if t0 is None else t0
        self.sample_rate = 0
        self.samples_sent = 0
        self.totals: StreamTotals | None = None
        self._first: Audio | Completed | None = None

    @property
    def job(self) -> str:
        return self._source.job

    def cancel(self) -> bool:
        return self._source.cancel()

    # --- before the first audio -------------------------------------------------------------

    async def start(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> int:
        if self._first is not None:
            return self.sample_rate
        try:
            self._first = await self._wait_first(disconnected)
        except BaseException:
            self._source.cancel()
            raise
        self.sample_rate = self._first.sample_rate
        if self.metrics is not None:
            self.metrics.ttfb.labels(self.api).observe(time.monotonic() - self.t0)
        return self.sample_rate

    async def _wait_first(self, disconnected: Callable[[], Awaitable[bool]] | None) -> Audio | Completed:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(TIMEOUT, f"no audio within {self.timeout_s:g} s; the job was cancelled")
            try:
                ev = await self._source.next_event(min(left, DISCONNECT_POLL_S) if disconnected else left)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    raise JobError(CLIENT_CLOSED, "the client went away") from None
                continue
            if isinstance(ev, Audio):
                return ev
            if isinstance(ev, Completed):
                if ev.samples and ev.samples == ev.done.samples:  # all of it at once (no live events came)
                    return ev
                raise JobError(NO_AUDIO, "the job produced no audio")
            if isinstance(ev, Rejected):
                raise JobError(ev.code, ev.message, ev.voices)
            if isinstance(ev, Failed):
                raise JobError(ev.code, ev.message)
            if isinstance(ev, BrokerRestarted):
                log.info("job %s: the broker restarted before any audio; resubmitted", self.job)

    # --- the audio -------------------------------------------------------------------------------

    async def audio(self) -> AsyncIterator[bytes]:
        await self.start()
        m, api = self.metrics, self.api
        if m is not None:
            m.active.labels(api).inc()
        try:
            first = self._first
            if isinstance(first, Completed):
                yield self._sent(first.data)
                self._complete(first)
                return
            assert first is not None
            yield self._sent(first.data)
            while True:
                try:
                    ev = await self._source.next_event(self.timeout_s)
                except asyncio.TimeoutError:
                    self._abort(TIMEOUT, f"no audio for {self.timeout_s:g} s")
                if isinstance(ev, Audio):
                    if ev.restart:
                        self._abort(RESTARTED, f"attempt {ev.attempt} restarted the audio (a worker was lost) "
                                               f"after {self.samples_sent} samples were sent")
                    if ev.data:
                        yield self._sent(ev.data)
                elif isinstance(ev, Completed):
                    # done.samples: a sentence-job stream's Completed holds no data (its audio came as events)
                    total = ev.done.samples
                    if self.samples_sent > total:
                        self._abort(INCOMPLETE_AUDIO, f"sent {self.samples_sent} samples but the job has {total}")
                    if self.samples_sent < total:  # audio the live events did not carry
                        tail = ev.data[self.samples_sent * 2:]
                        if self.samples_sent + len(tail) // 2 != total:
                            self._abort(INCOMPLETE_AUDIO, f"sent {self.samples_sent} samples, "
                                                          f"the job has {total} but holds {ev.samples}")
                        yield self._sent(tail)
                    self._complete(ev)
                    return
                elif isinstance(ev, (Failed, Rejected)):
                    self._abort(ev.code, f"failed mid-stream: {ev.message}")
                elif isinstance(ev, BrokerRestarted):
                    log.info("job %s: the broker restarted; resubmitted", self.job)
        finally:
            if m is not None:
                m.active.labels(api).dec()

    def _sent(self, data: bytes) -> bytes:
        self.samples_sent += len(data) // 2
        return data

    def _complete(self, ev: Completed) -> None:
        self.totals = StreamTotals(ev.done.samples, ev.sample_rate, self.input_chars, ev.done)
        if self.metrics is not None:
            self.metrics.audio_seconds.labels(self.api).inc(self.totals.seconds)
            self.metrics.job_done(ev.done.ttfc_ms, ev.done.rtf)

    def _abort(self, code: str, message: str) -> NoReturn:
        self._source.cancel()  # a live job we give up on (a failed one has ended: no-op)
        text = f"job {self.job}: {message}"
        log.warning("aborting the stream: %s", text)
        raise StreamAborted(code, text, self.samples_sent)
