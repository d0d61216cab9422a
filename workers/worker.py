"""A worker: one warm engine, jobs from the broker's back ROUTER, audio out on a publisher.

Sockets:
  DEALER  -> broker back ROUTER   READY / HEARTBEAT / DONE / FAILED, in: JOB / CANCEL / HEARTBEAT
                                   (main loop only)
  XPUB    -> broker audio-in XSUB  audio chunks. An XPUB (not a PUB) so the worker *sees* the
                                   broker's subscription arrive and announces READY only when
                                   its first chunk cannot be lost to a slow join. The main loop reads
                                   that subscription, then hands the socket to the synthesis threads,
                                   which send their chunks on it themselves under a lock: no thread
                                   hop between a chunk and the wire. Only the main loop opens and closes
                                   it (under the lock, after which no thread touches it again).

The synthesis threads own no socket: a run's outcome (DONE / FAILED / cancelled) goes to the main loop on a plain
queue, and a byte on a self-pipe wakes its poller. So no socket is ever used by one thread while another closes it.

The engine runs jobs on threads of its own (``Engine.start`` returns at once; simple engines through
``ThreadedEngine``), so heartbeats keep flowing while it works.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from cosy import protocol as P
from cosy import sdnotify
from cosy.endpoints import Endpoints
from cosy.security import prepare_client
from cosy.workers.engines import Engine, EngineError, SynthesisRequest
from cosy.workers.engines.base import CollectingSink, as_engine
from cosy.zmqio import send_frames, try_send

log = logging.getLogger("cosy.worker")

HEARTBEAT_S = 1.0
STALL_S = 120.0  # a run without a new chunk for this long has a stuck engine (see Worker.stall_s)
EXIT_STALLED = 75  # EX_TEMPFAIL: the worker left because a synthesis thread is stuck; restart it
VOICE_REFRESH_S = 5.0  # how often an engine with folder-based voices looks for new ones
LIVENESS = 3  # missed broker heartbeats before the worker reconnects


@dataclass
class Run:
    job: P.Job
    cancelled: threading.Event = field(default_factory=threading.Event)
    progress: float = field(default_factory=time.monotonic)  # when the engine last produced audio (or began)


@dataclass
class Stats:
    done: int = 0
    failed: int = 0
    ttfc_ms_sum: float = 0.0
    rtf_sum: float = 0.0

    def as_metrics(self) -> dict[str, float | None]:
        n = self.done
        return {"jobs_done": n, "jobs_failed": self.failed,  # the means are None (not 0) before the first job
                "mean_ttfc_ms": round(self.ttfc_ms_sum / n, 2) if n else None,
                "mean_rtf": round(self.rtf_sum / n, 4) if n else None}


class Worker:
    def __init__(self, engine: Engine, endpoints: Endpoints, name: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, liveness: int = LIVENESS,
                 ctx: zmq.Context | None = None, on_ready: callable | None = None, stall_s: float = STALL_S) -> None:
        self.engine = as_engine(engine)
        self.endpoints = endpoints
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        # A Python thread cannot be killed: when an engine stops producing (CosyVoice's stream waits forever once
        # its LLM thread died), the run is failed over as retryable and the worker leaves with EXIT_STALLED, so
        # that systemd or `cosy up` starts a fresh process. 0 turns the watchdog off.
        self.stall_s = stall_s
        self.stalled = False
        self.ctx = ctx or zmq.Context.instance()
        self.on_ready = on_ready
        self.runs: dict[str, Run] = {}
        self.stats = Stats()
        # A run's outcome, from the synthesis threads to the main loop: (b"D", DONE/FAILED frames) or (b"X", run).
        self._results: queue.SimpleQueue[tuple[bytes, list[bytes]]] = queue.SimpleQueue()
        self._wake: tuple[int, int] | None = None  # the self-pipe that wakes the main loop; guarded by _wake_lock
        self._wake_lock = threading.Lock()
        self._audio: zmq.Socket | None = None  # the XPUB, once the broker subscribed; guarded by _audio_lock
        self._audio_lock = threading.Lock()
        self._voices = [v.name for v in engine.voices()]
        self._sample_width = 2
        self.epoch = ""
        self._curve = endpoints.curve_dir if endpoints.secure else None

    # --- engine side (synthesis threads) ------------------------------------------

    def _post(self, kind: bytes, frames: list[bytes]) -> None:
        """Hand a run's outcome to the main loop (any thread, any time: after the loop ended it is just dropped)."""
        self._results.put((kind, frames))
        with self._wake_lock:
            if self._wake is not None:
                try:
                    os.write(self._wake[1], b"\0")
                except BlockingIOError:
                    pass  # the pipe is full: the loop is awake anyway

    def _publish(self, parts: list[Any]) -> None:
        with self._audio_lock:  # the lock also carries the socket safely between threads (a full barrier)
            if self._audio is not None:
                send_frames(self._audio, parts)

    def _request(self, run: Run) -> SynthesisRequest:
        job = run.job
        return SynthesisRequest(text=job.text, voice=job.voice or self.engine.default_voice, speed=job.speed,
                                job=job.job, instruct=job.instruct, run=job.run, cancelled=run.cancelled,
                                prompt_audio=job.prompt_audio, prompt_text=job.prompt_text)

    def _start(self, run: Run) -> None:
        """Hand the run to the engine (which returns at once); its audio reaches the wire through a RunSink."""
        sink = RunSink(self, run)
        try:
            self.engine.start(self._request(run), sink)
        except BaseException as exc:  # noqa: BLE001 - a refused start is the job's failure, not the worker's
            sink.failed(exc)

    # --- socket side (main loop) --------------------------------------------------

    def _connect_dealer(self) -> zmq.Socket:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, P.MAX_BACK_MSG)
        prepare_client(dealer, self._curve)
        dealer.connect(self.endpoints.back)
        return dealer

    def _ready_msg(self) -> P.Ready:
        e = self.engine
        return P.Ready(worker=self.name, engine=e.name, model=e.model, voices=self._voices,
                       default_voice=e.default_voice, sample_rate=e.sample_rate, device=e.device,
                       capacity=e.capacity, pid=os.getpid(), host=socket.gethostname(),
                       clone=bool(getattr(e, "clone", False)), instruct=bool(getattr(e, "instruct", False)))

    def warm_up(self, timeout: float = 600.0) -> None:
        """One job through the engine before READY (an engine with a ``warm_up`` of its own does more: graph
        capture, capacity measurement), so that the first user's job is not the slow one."""
        t0 = time.perf_counter()
        own = getattr(self.engine, "warm_up", None)
        if callable(own):
            own()
        else:
            sink = CollectingSink()
            self.engine.start(SynthesisRequest("Hello.", self.engine.default_voice, run="warm-up"), sink)
            sink.wait(timeout)
        log.info("engine %s warm in %.2f s (capacity %d)", self.engine.name, time.perf_counter() - t0,
                 self.engine.capacity)

    def _open_audio(self) -> zmq.Socket:
        """A fresh XPUB to the broker's audio-in. A new connection gets the broker's subscribe-all again, which is
        what READY waits for: after a reconnect the old XPUB's pipe may be stale or still be joining."""
        xpub = self.ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.SNDHWM, 100_000)
        prepare_client(xpub, self._curve)
        xpub.connect(self.endpoints.audio_in)
        return xpub

    def _close_audio(self, xpub: zmq.Socket) -> None:
        with self._audio_lock:  # no synthesis thread is on it, and none will be: _publish sees None
            self._audio = None
            xpub.close(linger=0)

    def run(self, stop: threading.Event) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        with self._wake_lock:
            self._wake = (wake_r, wake_w)
        xpub = self._open_audio()
        dealer = self._connect_dealer()

        poller = zmq.Poller()
        poller.register(wake_r, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)

        audio_ready = False
        registered = False
        acknowledged = False
        broker_seen = time.monotonic()
        next_hb = 0.0
        next_voices = time.monotonic() + VOICE_REFRESH_S
        watchdog = sdnotify.Watchdog()

        def register_again() -> None:
            """Whatever made us reconnect (a broker restart, RECONNECT, silence), register as at first start: READY
            only once a fresh audio publisher has the broker's subscription (no first chunk lost to a slow join)."""
            nonlocal xpub, audio_ready, registered
            self._cancel_all()
            if not audio_ready:
                poller.unregister(xpub)
            self._close_audio(xpub)
            xpub = self._open_audio()
            poller.register(xpub, zmq.POLLIN)
            audio_ready = registered = False
            self.epoch = ""  # the broker that acknowledges the new READY is the one we serve

        try:
            while not stop.is_set():
                now = time.monotonic()
                watchdog.tick()
                if audio_ready and not registered:
                    self._tell(dealer, self._ready_msg().to_frames())
                    registered = True
                    broker_seen = now
                    acknowledged = False
                if registered and now >= next_hb:
                    hb = P.Heartbeat(runs=list(self.runs), metrics={**self.stats.as_metrics(),
                                                                    **self.engine.metrics()})
                    self._tell(dealer, hb.to_frames())
                    next_hb = now + self.heartbeat_s
                if registered and now >= next_voices:
                    next_voices = now + VOICE_REFRESH_S
                    if self._voices_changed():
                        self._tell(dealer, dataclasses.replace(self._ready_msg(), update=True).to_frames())
                if self.stall_s and self._fail_stalled(now, dealer):
                    break
                if registered and now - broker_seen > self.heartbeat_s * self.liveness:
                    log.warning("broker silent for %.1f s: reconnecting", now - broker_seen)
                    poller.unregister(dealer)
                    dealer.close()
                    dealer = self._connect_dealer()
                    poller.register(dealer, zmq.POLLIN)
                    register_again()
                    broker_seen = now
                    continue
                timeout = max(0.0, min(next_hb - time.monotonic(), 0.25)) if registered else 0.25
                timeout = min(timeout, watchdog.due_in())
                events = dict(poller.poll(timeout * 1000))
                if wake_r in events:
                    _drain_pipe(wake_r)
                self._drain_results(dealer)
                if not audio_ready and xpub in events:
                    while True:
                        try:
                            sub = xpub.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        if sub[:1] == b"\x01":
                            audio_ready = True
                    if audio_ready:  # from now on the synthesis threads own the XPUB
                        poller.unregister(xpub)
                        with self._audio_lock:
                            self._audio = xpub
                if dealer in events:
                    while True:
                        try:
                            frames = dealer.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        broker_seen = time.monotonic()
                        if registered and not acknowledged:
                            acknowledged = True  # the broker answered our READY: we are serving
                            self._announce_ready()
                        if self._handle(frames, dealer) == "reconnect":
                            register_again()
            # Clean stop: tell the broker, so it requeues what we still run at once.
            self._cancel_all()
            if registered:
                self._tell(dealer, P.Disconnect().to_frames())
                time.sleep(0.05)  # let libzmq hand DISCONNECT to the socket before it closes
        finally:
            sdnotify.notify("STOPPING=1")
            self._close_audio(xpub)
            dealer.close(linger=0)
            with self._wake_lock:
                self._wake = None
                os.close(wake_r)
                os.close(wake_w)

    def _tell(self, dealer: zmq.Socket, frames: list[bytes]) -> None:
        """A message to the broker, never blocking: when the DEALER's queue is full the broker has not read for a
        long while, and the liveness window (or its RECONNECT) will have the worker register afresh; what is
        dropped meanwhile belongs to the registration that ends then (its runs are requeued)."""
        if not try_send(dealer, frames):
            log.warning("the broker is not reading: dropped a %s", frames[1].decode(errors="replace"))

    def _fail_stalled(self, now: float, dealer: zmq.Socket) -> bool:
        """Fail every run whose engine made no progress for stall_s (retryable elsewhere); True if any did."""
        stuck = [run for run in self.runs.values() if now - run.progress > self.stall_s]
        for run in stuck:
            job = run.job
            log.error("job %s (run %s): the engine produced nothing for %.0f s; failing it over and restarting "
                      "the worker", job.job, job.run, now - run.progress)
            self._cancel(run)
            del self.runs[job.run]
            self.stats.failed += 1
            self._tell(dealer, P.JobFailed(job.job, P.ENGINE_STALLED, f"the engine on {self.name} made no "
                                              f"progress for {self.stall_s:g} s", job.run, job.attempt,
                                              retryable=True).to_frames())
        if stuck:
            self.stalled = True
        return bool(stuck)

    def _voices_changed(self) -> bool:
        refresh = getattr(self.engine, "refresh_voices", None)
        if refresh is None:
            return False
        try:
            changed = bool(refresh())
        except Exception:
            log.exception("could not refresh the voices")
            return False
        if changed:
            self._voices = [v.name for v in self.engine.voices()]
            log.info("voices changed: %s", ", ".join(self._voices))
        return changed

    def _announce_ready(self) -> None:
        log.info("worker %s ready (%s, voices: %s)", self.name, self.engine.name, ", ".join(self._voices))
        sdnotify.notify(f"READY=1\nSTATUS=serving {self.engine.name} ({self.engine.model}) on {self.engine.device}")
        if self.on_ready:
            self.on_ready()

    def _cancel(self, run: Run) -> None:
        run.cancelled.set()
        try:
            self.engine.cancel(run.job.run)
        except Exception:  # noqa: BLE001 - the run is gone for the broker either way
            log.exception("engine could not cancel run %s", run.job.run)

    def _cancel_all(self) -> None:
        for run in list(self.runs.values()):
            self._cancel(run)
        self.runs.clear()

    def _handle(self, frames: list[bytes], dealer: zmq.Socket) -> str | None:
        try:
            msg = P.decode(frames, P.BROKER_TO_WORKER)
        except P.ProtocolError as exc:
            log.warning("dropped malformed message from broker: %s", exc)
            return None
        if isinstance(msg, P.Heartbeat):
            if self.epoch and msg.epoch and msg.epoch != self.epoch:
                log.info("broker restarted (epoch %s -> %s)", self.epoch, msg.epoch)
                self.epoch = msg.epoch
                return "reconnect"
            self.epoch = msg.epoch or self.epoch
        elif isinstance(msg, P.Job):
            if msg.run in self.runs:
                return None
            run = Run(msg)
            self.runs[msg.run] = run
            self._start(run)
        elif isinstance(msg, P.CancelRun):
            run = self.runs.pop(msg.run, None)
            if run:
                self._cancel(run)
        elif isinstance(msg, P.Reconnect):
            return "reconnect"
        return None

    def _drain_results(self, dealer: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                kind, body = self._results.get_nowait()
            except queue.Empty:
                return
            if kind == b"D":
                msg = P.decode(body, P.WORKER_MESSAGES)
                run = self.runs.pop(msg.run, None)
                if run is None:
                    continue  # cancelled meanwhile: the broker no longer wants it
                if isinstance(msg, P.JobDone):
                    self.stats.done += 1
                    self.stats.ttfc_ms_sum += msg.ttfc_ms
                    self.stats.rtf_sum += msg.rtf
                else:
                    self.stats.failed += 1
                self._tell(dealer, body)
            elif kind == b"X":
                self.runs.pop(body[0].decode(), None)


class RunSink:
    """One run's audio path, called by the engine's threads: chunks straight onto the XPUB, the outcome to the
    main loop through this thread's PUSH socket."""

    def __init__(self, worker: Worker, run: Run) -> None:
        self.worker = worker
        self.run = run
        self.topic = P.topic(run.job.job)
        self.rate = worker.engine.sample_rate
        self.t0 = time.perf_counter()
        self.ttfc = 0.0
        self.seq = 0
        self.samples = 0
        self.closed = False

    def audio(self, pcm: np.ndarray) -> None:
        if self.closed or self.run.cancelled.is_set():
            return
        data = _to_s16(pcm)
        if data.size == 0:
            return
        job = self.run.job
        self.run.progress = time.monotonic()
        if self.seq == 0:
            self.ttfc = (time.perf_counter() - self.t0) * 1000
        header = P.ChunkHeader(job.job, job.run, job.attempt, self.seq, self.rate, "s16le", 1)
        self.worker._publish([self.topic, header.pack(), data])
        self.seq += 1
        self.samples += data.size

    def done(self) -> None:
        if self._close():
            return
        job = self.run.job
        seq, samples, rate = self.seq, self.samples, self.rate
        final = P.ChunkHeader(job.job, job.run, job.attempt, seq, rate, "s16le", 1, final=True,
                              total_chunks=seq + 1, total_samples=samples)
        self.worker._publish([self.topic, final.pack(), b""])
        elapsed = time.perf_counter() - self.t0
        rtf = elapsed / (samples / rate) if samples else 0.0
        msg = P.JobDone(job.job, job.run, job.attempt, seq + 1, samples, rate, round(self.ttfc, 3), round(rtf, 5),
                        self.worker.name)
        self.worker._post(b"D", msg.to_frames())

    def failed(self, error: BaseException) -> None:
        if self._close():
            return
        job = self.run.job
        if isinstance(error, EngineError):
            log.warning("job %s failed: %s", job.job, error)
            message, retryable = str(error), error.retryable
        else:  # an engine bug must not take the worker down
            log.error("job %s: engine raised", job.job, exc_info=error)
            message = f"{error.__class__.__name__}: {error}"
            retryable = "out of memory" in str(error).lower()
        msg = P.JobFailed(job.job, P.ENGINE_ERROR, message, job.run, job.attempt, retryable)
        self.worker._post(b"D", msg.to_frames())

    def _close(self) -> bool:
        """Mark the run ended; True if it had ended already or was cancelled (nothing more to say)."""
        if self.closed:
            return True
        self.closed = True
        if self.run.cancelled.is_set():
            self.worker._post(b"X", [self.run.job.run.encode()])
            return True
        return False


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _to_s16(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim > 1:
        audio = audio.reshape(-1)
    if audio.dtype == np.int16:
        return np.ascontiguousarray(audio)
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
