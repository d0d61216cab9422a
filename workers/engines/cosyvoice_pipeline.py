"""cosy's streaming pipeline for CosyVoice2/3: one batched LLM loop for every stream, token-to-wave as soon as a
chunk's tokens exist, nothing polled (see docs/gpu.md).

    start(request, sink) --> frontend thread: text normalisation, text tokens, the voice's cached prompt
                               | features (the library's own frontend functions)
                               v
                             LLM loop thread: admits new streams (prefill into a free slot), then advances every
                               | active stream by one token per step, as one batch (one host sync per step)
                               v  a chunk's tokens are there: first after first_hop + pre_lookahead tokens
                             vocoder thread(s): the library's token2wav (flow + HiFT, its caches and fades) on its
                               | own CUDA stream, one stream's chunks strictly in order
                               v
                             sink.audio(pcm) ... sink.done()

Each stage wakes the next through a condition variable: no stage sleeps or polls. ``cancel(run)`` takes the
stream out of the batch at the next step and frees its slot and its caches.

A job's text is cut into the library's pieces (``text_normalize(split=True)``); each piece is one LLM stream with
its own prompt, length limits and vocoder caches, as the library runs one ``tts()`` per piece; the pieces of a job
run one after the other and its audio comes out in order.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .base import EngineError, Sink, SynthesisRequest

log = logging.getLogger("cosy.engine.pipeline")

TOKENS_PER_S = 25  # CosyVoice2/3 speech tokens per second of audio
MAX_SILENT = 5  # the library keeps at most this many consecutive silent tokens (CosyVoice3)


@dataclass(frozen=True)
class Schedule:
    """When a stream's tokens become audio: the first chunk after ``first_hop`` tokens (plus the flow's look-ahead),
    then hops that grow as the library's do: ``hop`` times ``scale`` after each chunk, up to ``max_hop`` (upstream:
    25 -> 50, 100, 100...; with scale 1, as in the PyPI fork, every later chunk is ``hop``)."""

    first_hop: int = 15
    hop: int = 25
    max_hop: int = 100
    scale: int = 2
    lookahead: int = 3

    def hops(self) -> collections.abc.Iterator[int]:
        yield self.first_hop
        hop = self.hop
        while True:
            hop = min(self.max_hop, hop * self.scale)
            yield hop


@dataclass(eq=False)
class Piece:
    """One LLM stream: a piece of a job's text with its model inputs (the library frontend's dict)."""

    inputs: dict[str, Any]
    seed: int
    tokens: list[int] = field(default_factory=list)  # what token2wav gets (silent runs trimmed, as the library)
    decoded: int = 0  # LLM steps taken
    max_tokens: int = 0
    min_tokens: int = 0
    offset: int = 0  # tokens already turned into audio
    hops: Any = None
    next_hop: int = 0
    silent_run: int = 0
    llm_done: bool = False
    uuid: str = ""
    chunks_scheduled: list[int] = field(default_factory=list)  # len(tokens) when each chunk was handed over


@dataclass(eq=False)
class Stream:
    """One job in the pipeline."""

    request: SynthesisRequest
    sink: Sink
    pieces: list[Piece] = field(default_factory=list)
    current: int = 0
    slot: int | None = None
    cancelled: bool = False
    ended: bool = False
    # the vocoder's work for this stream, in order; busy while a vocoder thread runs one of them
    tasks: collections.deque = field(default_factory=collections.deque)
    busy: bool = False
    first_audio: bool = False

    @property
    def run(self) -> str:
        return self.request.run

    @property
    def piece(self) -> Piece:
        return self.pieces[self.current]


@dataclass(frozen=True)
class Chunk:
    piece: Piece
    end: int  # tokens[:end] go to the flow
    offset: int
    finalize: bool
    last: bool  # the job's last chunk: sink.done() after it


class LLMBackend(Protocol):
    """The batched decoder behind the LLM loop (``torch``: cosy's own; ``vllm``: the library's vLLM export)."""

    slots: int
    stop_tokens: frozenset[int]

    def admit(self, stream: Stream, slot: int) -> list[int]:
        """Prefill ``stream``'s current piece into ``slot``; returns the tokens it already gave (torch: the first)."""
        ...

    def step(self, n: int) -> list[list[int]]:
        """New tokens for each of slots ``0..n-1`` (torch: exactly one each), with one host synchronisation."""
        ...

    def move(self, src: int, dst: int, stream: Stream) -> None:
        """The stream in ``src`` now lives in ``dst`` (compaction after a stream left)."""
        ...

    def release(self, slot: int, stream: Stream) -> None: ...

    def reset(self) -> None:
        """After a failed step: forget every slot."""
        ...


class Vocoder(Protocol):
    def start_piece(self, piece: Piece) -> None: ...

    def chunk(self, piece: Piece, end: int, offset: int, finalize: bool, speed: float) -> np.ndarray: ...

    def end_piece(self, piece: Piece) -> None: ...


class Pipeline:
    """The three stages and their threads. ``prepare(request)`` (the engine's frontend) turns a request into its
    pieces' model inputs; it runs on the frontend thread, never on the caller's."""

    def __init__(self, backend: LLMBackend, vocoder: Vocoder, prepare: Callable[[SynthesisRequest], list[dict]],
                 schedule: Schedule, token_limits: Callable[[dict], tuple[int, int]],
                 silent_tokens: frozenset[int] = frozenset(), vocoders: int = 1, max_batch: int | None = None) -> None:
        self.backend = backend
        self.vocoder = vocoder
        self.prepare = prepare
        self.schedule = schedule
        self.token_limits = token_limits
        self.silent_tokens = silent_tokens
        self.max_batch = min(max_batch or backend.slots, backend.slots)
        self.streams: dict[str, Stream] = {}
        self.active: list[Stream] = []  # index = slot
        self.pending: collections.deque[Stream] = collections.deque()
        self.frontend_queue: collections.deque[Stream] = collections.deque()
        self.ready: collections.deque[Stream] = collections.deque()  # streams with vocoder work
        self.lock = threading.Lock()
        self.llm_wake = threading.Condition(self.lock)
        self.frontend_wake = threading.Condition(self.lock)
        self.vocoder_wake = threading.Condition(self.lock)
        self.closed = False
        self.steps = 0
        self.step_batch_sum = 0
        self.largest_batch = 0
        self.restarts = 0
        self.oom_evictions = 0
        # The last pieces the LLM finished: (run, piece index, tokens, len(tokens) at each chunk). For tests and
        # debugging; bounded.
        self.finished: collections.deque[tuple[str, int, list[int], list[int]]] = collections.deque(maxlen=256)
        self.idle_wake = threading.Condition(self.lock)
        self.vocoding = 0  # chunks being turned into audio right now
        self.fault: Callable[[int], None] | None = None  # tests: called with the batch size before each step
        self.threads = [threading.Thread(target=self._frontend_loop, name="cosy-frontend", daemon=True),
                        threading.Thread(target=self._llm_loop, name="cosy-llm", daemon=True)]
        self.threads += [threading.Thread(target=self._vocoder_loop, name=f"cosy-vocoder-{i}", daemon=True)
                         for i in range(max(1, vocoders))]
        for t in self.threads:
            t.start()

    # --- the engine's side ---------------------------------------------------------------------

    def submit(self, request: SynthesisRequest, sink: Sink) -> None:
        stream = Stream(request, sink)
        with self.lock:
            if self.closed:
                raise EngineError("the engine is shutting down", retryable=True)
            self.streams[request.run] = stream
            self.frontend_queue.append(stream)
            self.frontend_wake.notify()

    def cancel(self, run: str) -> None:
        with self.lock:
            stream = self.streams.get(run)
            if stream is None:
                return
            stream.cancelled = True
            stream.tasks.clear()
            if stream in self.pending:
                self.pending.remove(stream)
            if stream.slot is None and not stream.busy:  # not in the LLM loop, not being vocoded: gone now
                self._forget(stream)
            self.llm_wake.notify()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.llm_wake.notify_all()
            self.frontend_wake.notify_all()
            self.vocoder_wake.notify_all()
        for t in self.threads:
            t.join(5)

    def stats(self) -> dict[str, float]:
        with self.lock:
            return {"llm_active": len(self.active), "llm_pending": len(self.pending), "llm_steps": self.steps,
                    "llm_mean_batch": round(self.step_batch_sum / self.steps, 2) if self.steps else 0.0,
                    "llm_largest_batch": self.largest_batch, "llm_restarts": self.restarts,
                    "llm_max_batch": self.max_batch, "llm_oom_evictions": self.oom_evictions}

    def _idle(self) -> bool:
        return not (self.streams or self.active or self.pending or self.vocoding)

    def idle(self) -> bool:
        with self.lock:
            return self._idle()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no job is in the pipeline and no stage works on one (True), or ``timeout`` passed (False)."""
        with self.lock:
            return self.idle_wake.wait_for(self._idle, timeout)

    # --- frontend ---------------------------------------------------------------------------------

    def _frontend_loop(self) -> None:
        while True:
            with self.lock:
                while not self.frontend_queue and not self.closed:
                    self.frontend_wake.wait()
                if self.closed:
                    return
                stream = self.frontend_queue.popleft()
                if stream.cancelled:
                    self._forget(stream)
                    continue
            try:
                inputs = self.prepare(stream.request)
                if not inputs:
                    raise EngineError("nothing to say: the text is empty after normalisation")
            except BaseException as exc:  # noqa: BLE001 - the job's failure, reported through its sink
                self._fail(stream, exc)
                continue
            seed = stream.request.seed
            if seed is None:
                seed = zlib.crc32((stream.request.job or stream.run).encode())
            stream.pieces = [Piece(inp, seed=seed + i) for i, inp in enumerate(inputs)]
            with self.lock:
                if stream.cancelled:
                    self._forget(stream)
                    continue
                self.pending.append(stream)
                self.llm_wake.notify()

    # --- the LLM loop -----------------------------------------------------------------------------

    def _llm_loop(self) -> None:
        context = getattr(self.backend, "thread_context", contextlib.nullcontext)
        with context():
            self._llm_turns()

    def _llm_turns(self) -> None:
        while True:
            with self.lock:
                while not self.closed and not self.active and not self.pending and not self._cancelled_active():
                    self.llm_wake.wait()
                if self.closed:
                    return
            try:
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
            except BaseException as exc:  # noqa: BLE001 - fail the batch, start again
                self._restart(exc)

    def _cancelled_active(self) -> bool:
        return any(s.cancelled for s in self.active)

    def _drop_cancelled(self) -> None:
        with self.lock:
            gone = [s for s in self.active if s.cancelled]
        for stream in gone:
            self._leave(stream)
            with self.lock:
                self._forget(stream)

    def _admit(self) -> None:
        while True:
            with self.lock:
                if not self.pending or len(self.active) >= self.max_batch:
                    return
                stream = self.pending.popleft()
                slot = len(self.active)
                self.active.append(stream)
                stream.slot = slot
            piece = stream.piece
            piece.min_tokens, piece.max_tokens = self.token_limits(piece.inputs)
            piece.hops = self.schedule.hops()
            piece.next_hop = next(piece.hops)
            piece.uuid = f"cosy-{uuid.uuid4().hex}"
            self.vocoder.start_piece(piece)
            for token in self.backend.admit(stream, slot):
                if self._take(stream, token):
                    break

    def _step(self) -> None:
        n = len(self.active)
        try:
            if self.fault is not None:
                self.fault(n)
            tokens = self.backend.step(n)
        except Exception as exc:
            from .cosyvoice import free_cuda_cache, is_oom

            if n == 1 or not is_oom(exc):
                raise
            # CUDA out of memory at this batch: the newest streams go (retryable, to another worker or later),
            # the admitted batch is lowered, and the survivors' step is taken again (a step commits nothing
            # before it completes: its cache writes are rewritten by the retry).
            keep = n // 2
            with self.lock:
                self.max_batch = keep
                evicted = self.active[keep:]
            for stream in reversed(evicted):
                self._leave(stream)
                self.oom_evictions += 1
            free_cuda_cache()
            log.warning("CUDA out of memory at batch %d: admitted batch lowered to %d, %d job(s) failed over", n,
                        keep, len(evicted))
            for stream in evicted:
                self._fail(stream, EngineError(f"CUDA out of memory at batch {n} (admitted batch lowered to "
                                               f"{keep}); retry", retryable=True))
            return
        self.steps += 1
        self.step_batch_sum += n
        self.largest_batch = max(self.largest_batch, n)
        for stream, new in zip(list(self.active), tokens, strict=True):
            for token in new:
                if self._take(stream, token):
                    break

    def _take(self, stream: Stream, token: int) -> bool:
        """One sampled token for the stream's current piece: keep it, schedule audio, end the piece (True)."""
        piece = stream.piece
        if stream.cancelled:
            return True
        stop = token in self.backend.stop_tokens
        if not stop:
            piece.decoded += 1
            if token in self.silent_tokens:
                piece.silent_run += 1
            else:
                piece.silent_run = 0
            if piece.silent_run <= MAX_SILENT:
                piece.tokens.append(token)
        if stop or piece.decoded >= piece.max_tokens:
            piece.llm_done = True
        speed = stream.request.speed
        streaming = abs(speed - 1.0) < 1e-3
        while streaming and len(piece.tokens) - piece.offset >= piece.next_hop + self.schedule.lookahead:
            end = piece.offset + piece.next_hop + self.schedule.lookahead
            piece.chunks_scheduled.append(len(piece.tokens))
            self._vocode(stream, Chunk(piece, end, piece.offset, finalize=False, last=False))
            piece.offset += piece.next_hop
            piece.next_hop = next(piece.hops)
        if piece.llm_done:
            last = stream.current == len(stream.pieces) - 1
            piece.chunks_scheduled.append(len(piece.tokens))
            self.finished.append((stream.run, stream.current, list(piece.tokens), list(piece.chunks_scheduled)))
            self._vocode(stream, Chunk(piece, len(piece.tokens), piece.offset, finalize=True, last=last))
            self._leave(stream)
            if not last:
                with self.lock:
                    stream.current += 1
                    self.pending.appendleft(stream)  # its next piece goes first: the job is already under way
            return True
        return False

    def _leave(self, stream: Stream) -> None:
        """Take the stream out of the batch; the last active stream moves into its slot."""
        with self.lock:
            slot = stream.slot
            if slot is None:
                return
            last = len(self.active) - 1
            mover = self.active[last]
            self.active[slot] = mover
            self.active.pop()
            stream.slot = None
            if mover is not stream:
                mover.slot = slot
        if mover is not stream:
            self.backend.move(last, slot, mover)
        self.backend.release(last, stream)

    def _restart(self, exc: BaseException) -> None:
        """The LLM loop raised: every stream in it fails retryably (another worker may succeed), the loop goes on.
        CUDA out of memory lowers the admitted batch first."""
        from .cosyvoice import free_cuda_cache, is_oom

        oom = is_oom(exc)
        with self.lock:
            victims = list(self.active)
            self.active.clear()
            self.restarts += 1
            if oom and len(victims) > 1:
                self.max_batch = max(1, len(victims) // 2)
        log.error("LLM loop failed at batch %d (%s: %s): failing its %d job(s) as retryable%s", len(victims),
                  exc.__class__.__name__, exc, len(victims),
                  f"; admitted batch lowered to {self.max_batch}" if oom else "", exc_info=not oom)
        try:
            self.backend.reset()
        except Exception:  # noqa: BLE001
            log.exception("LLM backend reset failed")
        if oom:
            free_cuda_cache()
        what = "CUDA out of memory" if oom else f"{exc.__class__.__name__}: {exc}"
        for stream in victims:
            stream.slot = None
            self._fail(stream, EngineError(f"the LLM loop failed ({what}); retry elsewhere", retryable=True))

    # --- vocoder ----------------------------------------------------------------------------------

    def _vocode(self, stream: Stream, chunk: Chunk) -> None:
        with self.lock:
            if stream.cancelled or stream.ended:
                return
            stream.tasks.append(chunk)
            if not stream.busy and stream not in self.ready:
                if stream.first_audio:
                    self.ready.append(stream)
                else:  # a first chunk goes ahead of the other streams' later ones: first audio is what users wait on
                    self.ready.appendleft(stream)
                self.vocoder_wake.notify()

    def _vocoder_loop(self) -> None:
        while True:
            with self.lock:
                while not self.ready and not self.closed:
                    self.vocoder_wake.wait()
                if self.closed:
                    return
                stream = self.ready.popleft()
                if not stream.tasks:
                    continue
                chunk = stream.tasks.popleft()
                stream.busy = True
                self.vocoding += 1
            try:
                if not stream.cancelled:
                    audio = self.vocoder.chunk(chunk.piece, chunk.end, chunk.offset, chunk.finalize,
                                               stream.request.speed)
                    if audio.size and not stream.cancelled:
                        stream.first_audio = True
                        stream.sink.audio(audio)
                if chunk.finalize:
                    self.vocoder.end_piece(chunk.piece)
                if chunk.last and not stream.cancelled:
                    with self.lock:
                        stream.ended = True
                        self._forget(stream)
                    stream.sink.done()
            except BaseException as exc:  # noqa: BLE001 - this job's failure; the others go on
                self.vocoder.end_piece(chunk.piece)
                with self.lock:
                    stream.cancelled = True  # the LLM loop lets it go at its next step
                    self.llm_wake.notify()
                self._fail(stream, exc)
            finally:
                with self.lock:
                    stream.busy = False
                    self.vocoding -= 1
                    if stream.tasks and not stream.cancelled:
                        self.ready.append(stream)
                        self.vocoder_wake.notify()
                    elif stream.cancelled:
                        stream.tasks.clear()
                        if stream.slot is None:
                            self._forget(stream)
                    if self._idle():
                        self.idle_wake.notify_all()

    # --- bookkeeping --------------------------------------------------------------------------------

    def _fail(self, stream: Stream, exc: BaseException) -> None:
        with self.lock:
            if stream.ended:
                return
            stream.ended = True
            stream.cancelled = True
            stream.tasks.clear()
            self._forget(stream)
        from .cosyvoice import free_cuda_cache, is_oom

        if is_oom(exc) and not isinstance(exc, EngineError):
            free_cuda_cache()
            exc = EngineError(f"CUDA out of memory: {exc}", retryable=True)
        stream.sink.failed(exc)

    def _forget(self, stream: Stream) -> None:
        """(lock held) The pipeline no longer knows the run."""
        if self.streams.get(stream.run) is stream:
            del self.streams[stream.run]
        if self._idle():
            self.idle_wake.notify_all()
        if stream.slot is None and not stream.busy:
            self._release_pieces(stream)

    def _release_pieces(self, stream: Stream) -> None:
        for piece in stream.pieces:
            if piece.uuid:
                self.vocoder.end_piece(piece)
