"""A worker: one warm engine, jobs from the broker's back ROUTER, audio out on a publisher.

Sockets:
  DEALER  -> broker back ROUTER   READY / HEARTBEAT / DONE / FAILED, in: JOB / CANCEL / HEARTBEAT
                                   (main loop only)
  XPUB    -> broker audio-in XSUB  audio chunks. An XPUB (not a PUB) so the worker *sees* the
                                   broker's subscription arrive and announces READY only when
                                   its first chunk cannot be lost to a slow join. The main loop reads
                                   that subscription, then hands the socket to the synthesis threads,
                                   which send their chunks on it themselves under a lock: no thread
                                   hop between a chunk and the wire.
  PULL    <- inproc, from the synthesis threads (each has its own PUSH): DONE / FAILED / cancelled

Inference runs in threads so heartbeats keep flowing while the engine works.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from cosy import protocol as P
from cosy import sdnotify
from cosy.endpoints import Endpoints
from cosy.security import prepare_client
from cosy.workers.engines import Engine, EngineError, SynthesisRequest
from cosy.zmqio import send_frames

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

    def as_metrics(self) -> dict[str, float]:
        n = max(self.done, 1)
        return {"jobs_done": self.done, "jobs_failed": self.failed,
                "mean_ttfc_ms": round(self.ttfc_ms_sum / n, 2), "mean_rtf": round(self.rtf_sum / n, 4)}


class Worker:
    def __init__(self, engine: Engine, endpoints: Endpoints, name: str | None = None,
                 heartbeat_s: float = HEARTBEAT_S, liveness: int = LIVENESS,
                 ctx: zmq.Context | None = None, on_ready: callable | None = None, stall_s: float = STALL_S) -> None:
        self.engine = engine
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
        self._results_ep = f"inproc://cosy-results-{uuid.uuid4().hex}"
        self._local = threading.local()
        self._pushers: list[zmq.Socket] = []
        self._pushers_lock = threading.Lock()
        self._audio: zmq.Socket | None = None  # the XPUB, once the broker subscribed; guarded by _audio_lock
        self._audio_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=engine.capacity, thread_name_prefix="synth")
        self._voices = [v.name for v in engine.voices()]
        self._sample_width = 2
        self.epoch = ""
        self._curve = endpoints.curve_dir if endpoints.secure else None

    # --- engine side (synthesis threads) ------------------------------------------

    def _pusher(self) -> zmq.Socket:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._results_ep)
            self._local.push = sock
            with self._pushers_lock:
                self._pushers.append(sock)
        return sock

    def _publish(self, parts: list[Any]) -> None:
        with self._audio_lock:  # the lock also carries the socket safely between threads (a full barrier)
            if self._audio is not None:
                send_frames(self._audio, parts)

    def _synthesize(self, run: Run) -> None:
        job = run.job
        push = self._pusher()
        topic = P.topic(job.job)
        t0 = time.perf_counter()
        ttfc = 0.0
        seq = 0
        samples = 0
        rate = self.engine.sample_rate
        try:
            request = SynthesisRequest(text=job.text, voice=job.voice or self.engine.default_voice,
                                       speed=job.speed, job=job.job, instruct=job.instruct,
                                       cancelled=run.cancelled)
            for audio in self.engine.synthesize(request):
                if run.cancelled.is_set():
                    break
                pcm = _to_s16(audio)
                if pcm.size == 0:
                    continue
                run.progress = time.monotonic()
                if seq == 0:
                    ttfc = (time.perf_counter() - t0) * 1000
                header = P.ChunkHeader(job.job, job.run, job.attempt, seq, rate, "s16le", 1)
                self._publish([topic, header.pack(), pcm])
                seq += 1
                samples += pcm.size
            if run.cancelled.is_set():
                push.send_multipart([b"X", job.run.encode()])
                return
            final = P.ChunkHeader(job.job, job.run, job.attempt, seq, rate, "s16le", 1, final=True,
                                  total_chunks=seq + 1, total_samples=samples)
            self._publish([topic, final.pack(), b""])
            elapsed = time.perf_counter() - t0
            rtf = elapsed / (samples / rate) if samples else 0.0
            done = P.JobDone(job.job, job.run, job.attempt, seq + 1, samples, rate, round(ttfc, 3),
                             round(rtf, 5), self.name)
            push.send_multipart([b"D", *done.to_frames()])
        except EngineError as exc:
            log.warning("job %s failed: %s", job.job, exc)
            failed = P.JobFailed(job.job, P.ENGINE_ERROR, str(exc), job.run, job.attempt, exc.retryable)
            push.send_multipart([b"D", *failed.to_frames()])
        except Exception as exc:  # an engine bug must not take the worker down
            log.exception("job %s: engine raised", job.job)
            oom = "out of memory" in str(exc).lower()
            failed = P.JobFailed(job.job, P.ENGINE_ERROR, f"{exc.__class__.__name__}: {exc}", job.run,
                                 job.attempt, retryable=oom)
            push.send_multipart([b"D", *failed.to_frames()])

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
                       capacity=e.capacity, pid=os.getpid(), host=socket.gethostname())

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        for _ in self.engine.synthesize(SynthesisRequest("Hello.", self.engine.default_voice)):
            pass
        log.info("engine %s warm in %.2f s", self.engine.name, time.perf_counter() - t0)

    def run(self, stop: threading.Event) -> None:
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self._results_ep)
        xpub = self.ctx.socket(zmq.XPUB)
        xpub.setsockopt(zmq.LINGER, 0)
        xpub.setsockopt(zmq.SNDHWM, 100_000)
        prepare_client(xpub, self._curve)
        xpub.connect(self.endpoints.audio_in)
        dealer = self._connect_dealer()

        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(xpub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)

        audio_ready = False
        registered = False
        acknowledged = False
        broker_seen = time.monotonic()
        next_hb = 0.0
        next_voices = time.monotonic() + VOICE_REFRESH_S
        watchdog = sdnotify.Watchdog()
        try:
            while not stop.is_set():
                now = time.monotonic()
                watchdog.tick()
                if audio_ready and not registered:
                    dealer.send_multipart(self._ready_msg().to_frames())
                    registered = True
                    broker_seen = now
                    acknowledged = False
                if registered and now >= next_hb:
                    hb = P.Heartbeat(runs=list(self.runs), metrics={**self.stats.as_metrics(),
                                                                    **self.engine.metrics()})
                    dealer.send_multipart(hb.to_frames())
                    next_hb = now + self.heartbeat_s
                if registered and now >= next_voices:
                    next_voices = now + VOICE_REFRESH_S
                    if self._voices_changed():
                        dealer.send_multipart(dataclasses.replace(self._ready_msg(), update=True).to_frames())
                if self.stall_s and self._fail_stalled(now, dealer):
                    break
                if registered and now - broker_seen > self.heartbeat_s * self.liveness:
                    log.warning("broker silent for %.1f s: reconnecting", now - broker_seen)
                    self._cancel_all()
                    poller.unregister(dealer)
                    dealer.close()
                    dealer = self._connect_dealer()
                    poller.register(dealer, zmq.POLLIN)
                    registered = False
                    broker_seen = now
                    continue
                timeout = max(0.0, min(next_hb - time.monotonic(), 0.25)) if registered else 0.25
                timeout = min(timeout, watchdog.due_in())
                events = dict(poller.poll(timeout * 1000))
                if pull in events:
                    self._drain_results(pull, dealer)
                if xpub in events:
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
                            self._cancel_all()
                            registered = False
            # Clean stop: tell the broker, so it requeues what we still run at once.
            self._cancel_all()
            if registered:
                dealer.send_multipart(P.Disconnect().to_frames())
                time.sleep(0.05)  # let libzmq hand DISCONNECT to the socket before it closes
        finally:
            sdnotify.notify("STOPPING=1")
            self._pool.shutdown(wait=False, cancel_futures=True)
            with self._audio_lock:
                self._audio = None
                xpub.close(linger=0)
            for sock in (pull, dealer):
                sock.close(linger=0)
            with self._pushers_lock:
                for s in self._pushers:
                    try:
                        s.close(linger=0)
                    except zmq.ZMQError:
                        pass

    def _fail_stalled(self, now: float, dealer: zmq.Socket) -> bool:
        """Fail every run whose engine made no progress for stall_s (retryable elsewhere); True if any did."""
        stuck = [run for run in self.runs.values() if now - run.progress > self.stall_s]
        for run in stuck:
            job = run.job
            log.error("job %s (run %s): the engine produced nothing for %.0f s; failing it over and restarting "
                      "the worker", job.job, job.run, now - run.progress)
            run.cancelled.set()
            del self.runs[job.run]
            self.stats.failed += 1
            dealer.send_multipart(P.JobFailed(job.job, P.ENGINE_STALLED, f"the engine on {self.name} made no "
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

    def _cancel_all(self) -> None:
        for run in self.runs.values():
            run.cancelled.set()
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
            self._pool.submit(self._synthesize, run)
        elif isinstance(msg, P.CancelRun):
            run = self.runs.pop(msg.run, None)
            if run:
                run.cancelled.set()
        elif isinstance(msg, P.Reconnect):
            return "reconnect"
        return None

    def _drain_results(self, pull: zmq.Socket, dealer: zmq.Socket) -> None:
        for _ in range(1000):
            try:
                frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            kind = frames[0].bytes
            if kind == b"D":
                body = [f.bytes for f in frames[1:]]
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
                dealer.send_multipart(body)
            elif kind == b"X":
                self.runs.pop(frames[1].bytes.decode(), None)


def _to_s16(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.ndim > 1:
        audio = audio.reshape(-1)
    if audio.dtype == np.int16:
        return np.ascontiguousarray(audio)
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
