"""The broker: one process, one poll loop, four sockets.

  front     ROUTER  clients: SUBMIT / CANCEL / STATUS / PING / REPLAY
  back      ROUTER  workers: READY / HEARTBEAT / DONE / FAILED / DISCONNECT
  audio_in  XSUB    the workers' audio; subscribed to everything
  audio_out XPUB    clients subscribe to their jobs' topics (XPUB_VERBOSE: the broker sees each)

The broker forwards audio itself (not zmq.proxy) so that it can note each run's first
chunk and keep a bounded replay buffer that repairs what PUB/SUB dropped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from cosy import __version__, sdnotify
from cosy import protocol as P
from cosy.broker.replay import ReplayStore
from cosy.broker.scheduler import JobEntry, Scheduler, WorkerEntry
from cosy.endpoints import Endpoints, ensure_runtime_dir
from cosy.zmqio import recv_frames, send_frames

log = logging.getLogger("cosy.broker")


@dataclass
class BrokerConfig:
    heartbeat_s: float = 1.0
    liveness: int = 3
    max_queue: int = 20_000
    max_prompt_bytes: int = 256 << 20  # queued jobs' own prompt audio, in all (then BUSY)
    max_attempts: int = 3
    max_text: int = P.MAX_TEXT_CHARS
    subscribe_wait_s: float = 2.0
    client_timeout_s: float = 10.0
    replay_bytes: int = 64 << 20  # total replay buffer across runs
    replay_ttl_s: float = 60.0
    metrics_port: int | None = None  # Prometheus exporter (cosy.metrics), off by default
    outbox_limit: int = 200_000  # messages held for a client that does not read, before dropping
    group_shared: bool = False
    audio_hwm: int = 100_000  # chunks queued per subscriber before PUB/SUB drops (then replay repairs)


class BrokerAlreadyRunning(RuntimeError):
    pass


class Broker:
    def __init__(self, endpoints: Endpoints, config: BrokerConfig | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.endpoints = endpoints
        self.config = config or BrokerConfig()
        self.ctx = ctx or zmq.Context.instance()
        self.epoch = uuid.uuid4().hex[:12]
        self.started = time.time()
        self.sched = Scheduler(self.config.max_queue, self.config.max_attempts, self.config.subscribe_wait_s)
        self.subscribed: set[bytes] = set()
        self.clients: dict[str, tuple[bytes, float]] = {}  # client id -> (route, last seen)
        self.replay = ReplayStore(self.config.replay_bytes, self.config.replay_ttl_s)
        self.outbox: dict[bytes, deque[list[Any]]] = {}
        self._front_pending: list[tuple[bytes, list[Any]]] = []  # this turn's messages to clients (_send)
        self.counters = {"accepted": 0, "rejected": 0, "done": 0, "failed": 0, "retried": 0,
                         "cancelled": 0, "malformed": 0, "replayed": 0}
        self.ttfc_ms: list[float] = []
        self._lock_file: Any = None
        self.metrics: Any = None
        if self.config.metrics_port:
            from cosy.metrics import BrokerMetrics

            self.metrics = BrokerMetrics()
        self.bound = threading.Event()

    # --- setup ----------------------------------------------------------------------

    def _lock_runtime_dir(self) -> None:
        rd = self.endpoints.runtime_dir
        if rd is None:
            return
        ensure_runtime_dir(rd, self.config.group_shared)
        if self.endpoints.is_tcp:
            return
        self._lock_file = open(rd / "broker.lock", "a+")  # noqa: SIM115 - held for the broker's lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BrokerAlreadyRunning(f"a broker is already running in {rd}") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def _bind(self) -> None:
        self._keys = None
        if self.endpoints.secure:
            from cosy import security

            self._keys = security.server_keys(self.endpoints.curve_dir)  # type: ignore[arg-type]
            self._auth = security.start_authenticator(self.ctx, self._keys)
        old = os.umask(0o117 if self.config.group_shared else 0o177)
        try:
            # Clients connect with their client id as routing id; HANDOVER gives a reconnecting client its route back.
            self.front = self._socket(zmq.ROUTER, self.endpoints.front, P.MAX_FRONT_MSG,
                                      {zmq.ROUTER_MANDATORY: 1, zmq.ROUTER_HANDOVER: 1})
            self.back = self._socket(zmq.ROUTER, self.endpoints.back, P.MAX_BACK_MSG, {zmq.ROUTER_MANDATORY: 1})
            self.audio_in = self._socket(zmq.XSUB, self.endpoints.audio_in, P.MAX_AUDIO_MSG, {zmq.RCVHWM: 100_000})
            self.audio_in.send(b"\x01")  # subscribe to everything: the broker buffers all audio
            self.audio_out = self._socket(zmq.XPUB, self.endpoints.audio_out, P.MAX_SUB_MSG,
                                          {zmq.XPUB_VERBOSE: 1, zmq.SNDHWM: self.config.audio_hwm})
        finally:
            os.umask(old)

    def _socket(self, kind: int, endpoint: str, max_msg: int, options: dict[int, int]) -> zmq.Socket:
        # Options before bind: libzmq gives each accepted connection the options the socket had at bind.
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg)
        for option, value in options.items():
            sock.setsockopt(option, value)
        if self._keys is not None:
            from cosy.security import secure_server

            secure_server(sock, self._keys)
        sock.bind(endpoint)
        return sock

    # --- main loop ------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self._lock_runtime_dir()
        self._bind()
        if self.metrics:
            self.metrics.serve(self.config.metrics_port)
        self.bound.set()
        log.info("broker %s listening on %s (epoch %s)", __version__, self.endpoints.front, self.epoch)
        sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self._status_line()}")
        watchdog = sdnotify.Watchdog()
        next_status = 0.0
        poller = zmq.Poller()
        for s in (self.front, self.back, self.audio_in, self.audio_out):
            poller.register(s, zmq.POLLIN)
        next_hb = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat(now)
                    next_hb = now + self.config.heartbeat_s
                watchdog.tick()
                if now >= next_status:
                    sdnotify.notify(f"STATUS={self._status_line()}")
                    next_status = now + 5.0
                timeout_ms = max(0.0, min(next_hb - now, 0.01 if self.outbox else 0.1, watchdog.due_in())) * 1000
                events = dict(poller.poll(timeout_ms))
                if self.audio_in in events:
                    self._forward_audio()
                if self.audio_out in events:
                    self._read_subscriptions()
                if self.back in events:
                    self._drain(self.back, self._on_worker)
                if self.front in events:
                    self._drain(self.front, self._on_client)
                self._dispatch()
                self._flush_front()
                if self.outbox:
                    self._flush_outbox()
        finally:
            sdnotify.notify("STOPPING=1")
            if self.metrics:
                self.metrics.close()
            self.close()

    def _status_line(self) -> str:
        q = self.sched.queued
        return (f"{len(self.sched.workers)} workers, {len(self.sched.runs)} running, "
                f"queued {q[P.INTERACTIVE]} interactive + {q[P.BULK]} bulk")

    def close(self) -> None:
        for name in ("front", "back", "audio_in", "audio_out"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
        if not self.endpoints.is_tcp and self.endpoints.runtime_dir:
            for ep in self.endpoints.as_dict().values():
                try:
                    Path(ep[len("ipc://"):]).unlink()
                except OSError:
                    pass
        if self._lock_file:
            self._lock_file.close()
            self._lock_file = None
        auth = getattr(self, "_auth", None)
        if auth is not None:
            auth.stop()
        log.info("broker stopped")

    def _drain(self, sock: zmq.Socket, handler: Any) -> None:
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.counters["malformed"] += 1
                continue
            try:
                handler(frames[0], frames[1:])
            except P.ProtocolError as exc:
                self.counters["malformed"] += 1
                log.warning("dropped malformed message: %s", exc)
            except Exception:  # a bug in one handler must not take the broker down
                self.counters["malformed"] += 1
                log.exception("error while handling a message; dropped")

    def _send(self, sock: zmq.Socket, route: bytes, frames: list[Any]) -> bool:
        """Send without ever blocking the loop. A client whose queue is full (it is busy submitting,
        not reading) gets the message later from its outbox, in order: no DONE is ever dropped.

        Messages to clients wait until the end of the loop's turn (`_flush_front`), in order: the jobs of
        the turn go to the workers first, and a client woken by its ACCEPTED does not compete for the CPU
        with the worker that is about to synthesize its first chunk."""
        if sock is self.front:
            self._front_pending.append((route, frames))
            return True
        return self._send_now(sock, route, frames)

    def _flush_front(self) -> None:
        pending, self._front_pending = self._front_pending, []
        for route, frames in pending:
            self._send_now(self.front, route, frames)

    def _send_now(self, sock: zmq.Socket, route: bytes, frames: list[Any]) -> bool:
        if sock is self.front and route in self.outbox:
            return self._queue_out(route, frames)
        try:
            sock.send_multipart([route, *frames], zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            if sock is self.front:
                return self._queue_out(route, frames)
            log.debug("worker %r is not reading; message dropped", route)
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone
            if sock is self.front and self._reconnects(route):
                return self._queue_out(route, frames)  # it comes back under the same route: keep it for then
            log.debug("could not send to %r: %s", route, exc)
            return False

    def _reconnects(self, route: bytes) -> bool:
        """A client whose route is its client id (PROTOCOL.md, "Routing"), not yet timed out: while it is away, its
        messages wait in its outbox, and its reconnection (ROUTER_HANDOVER) gets them."""
        try:
            client = route.decode()
        except UnicodeDecodeError:
            return False
        known = self.clients.get(client)
        return known is not None and known[0] == route

    def _queue_out(self, route: bytes, frames: list[Any]) -> bool:
        box = self.outbox.setdefault(route, deque())
        if len(box) >= self.config.outbox_limit:
            log.warning("client %r has not read %d messages; dropping the oldest", route, len(box))
            box.popleft()
        box.append(frames)
        return True

    def _flush_outbox(self) -> None:
        for route in list(self.outbox):
            box = self.outbox[route]
            try:
                while box:
                    self.front.send_multipart([route, *box[0]], zmq.NOBLOCK, copy=False)
                    box.popleft()
            except zmq.Again:
                continue
            except zmq.ZMQError:
                if self._reconnects(route):
                    continue  # between two connections: kept until it is back or times out
                box.clear()  # the client is gone
            del self.outbox[route]

    def _to_client(self, client: str, msg: P.Message) -> None:
        route = self.clients.get(client)
        if route:
            self._send(self.front, route[0], msg.to_frames())

    # --- audio ----------------------------------------------------------------------

    def _forward_audio(self) -> None:
        runs, replay, counters = self.sched.runs, self.replay, self.counters
        now = time.monotonic()
        audio_in, audio_out = self.audio_in, self.audio_out
        for _ in range(1000):
            try:
                frames = recv_frames(audio_in)
            except zmq.Again:
                return
            if len(frames) != 3:
                counters["malformed"] += 1
                continue
            try:
                header = P.ChunkHeader.unpack(frames[1].bytes)
            except P.ProtocolError:
                counters["malformed"] += 1
                continue
            entry = runs.get(header.run)
            if entry is not None:
                job = entry.job
                if not entry.first_chunk:
                    entry.first_chunk = now
            else:
                # The worker's DONE (on the back socket) can overtake the run's last chunks (on audio-in): a run
                # that finished a moment ago still gets them forwarded, whether or not its chunks are buffered.
                late = replay.late_job(header.run)
                if late is None:
                    continue  # a cancelled or unknown run: nobody wants it
                job = late
            if header.job != job or frames[0].bytes != P.topic(job):
                counters["malformed"] += 1
                continue
            replay.add(header, frames[1], frames[2], now)
            try:
                send_frames(audio_out, frames)
            except zmq.Again:
                pass  # the replay buffer covers it

    def _read_subscriptions(self) -> None:
        for _ in range(1000):
            try:
                msg = self.audio_out.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[:1] == b"\x01":
                self.subscribed.add(msg[1:])
            elif msg[:1] == b"\x00":
                self.subscribed.discard(msg[1:])

    # --- clients --------------------------------------------------------------------

    def _on_client(self, route: bytes, frames: list[bytes]) -> None:
        msg = P.decode(frames, P.CLIENT_MESSAGES)
        now = time.monotonic()
        if isinstance(msg, (P.Submit, P.Cancel, P.Ping)):
            self.clients[msg.client] = (route, now)
        if isinstance(msg, P.Submit):
            self._on_submit(route, msg)
        elif isinstance(msg, P.Cancel):
            entry = self.sched.jobs.get(msg.job)
            if entry is None or entry.client != msg.client:
                self._send(self.front, route, P.Rejected(msg.job, P.UNKNOWN_JOB, "no such job").to_frames())
                return
            self._cancel(entry, P.CANCELLED, "cancelled by the client")
        elif isinstance(msg, P.Ping):
            self._send(self.front, route, P.Pong(self.epoch).to_frames())
        elif isinstance(msg, P.StatusRequest):
            self._send(self.front, route, P.StatusReply(self.status()).to_frames())
        elif isinstance(msg, P.Replay):
            self._on_replay(route, msg)

    def _count(self, outcome: str) -> None:
        self.counters[outcome] += 1
        if self.metrics:
            if outcome == "retried":
                self.metrics.retried()
            else:
                self.metrics.count(outcome)

    def _reject(self, route: bytes, job: str, code: str, message: str, voices: list[str] | None = None) -> None:
        self._count("rejected")
        self._send(self.front, route, P.Rejected(job, code, message, voices or []).to_frames())

    def _on_submit(self, route: bytes, msg: P.Submit) -> None:
        existing = self.sched.jobs.get(msg.job)
        if existing is not None:
            if existing.client != msg.client:
                self._reject(route, msg.job, P.DUPLICATE_JOB, f"job id {msg.job!r} is in use by another client")
                return
            # Idempotent resubmission (the client lost our ACCEPTED): same job, nothing new queued.
            self._send(self.front, route, P.Accepted(msg.job, self.epoch, self.sched.queue_length()).to_frames())
            return
        text = msg.text.strip()
        if not text:
            self._reject(route, msg.job, P.BAD_REQUEST, "text is empty")
            return
        if len(msg.text) > self.config.max_text:
            self._reject(route, msg.job, P.TEXT_TOO_LONG,
                         f"text is {len(msg.text)} characters; the limit is {self.config.max_text}")
            return
        if not (0.25 <= msg.speed <= 4.0):
            self._reject(route, msg.job, P.BAD_REQUEST, f"speed {msg.speed} is outside 0.25-4.0")
            return
        voice = None if msg.voice in ("default", "") else msg.voice  # "default": each worker's own default
        voices = self.sched.voices()
        if msg.prompt_audio:  # the job brings its own voice: the voice name does not matter
            voice = None
            if self.sched.workers and not self.sched.can_clone():
                engines = sorted({w.info.engine for w in self.sched.workers.values()})
                self._reject(route, msg.job, P.CANNOT_CLONE,
                             "no worker here clones a voice from a job's own prompt (engines that can: cosyvoice; "
                             f"serving now: {', '.join(engines)}); use one of the served voices", voices)
                return
            queued = sum(len(e.prompt_audio) for e in self.sched.jobs.values())
            if queued + len(msg.prompt_audio) > self.config.max_prompt_bytes:
                self._reject(route, msg.job, P.BUSY, "too much prompt audio is queued; retry later")
                return
        elif voice is not None and self.sched.workers and voice not in voices:
            self._reject(route, msg.job, P.UNKNOWN_VOICE,
                         f"unknown voice {msg.voice!r}; available: {', '.join(voices)}", voices)
            return
        if self.sched.queue_length() >= self.config.max_queue:
            self._reject(route, msg.job, P.BUSY, f"queue is full ({self.config.max_queue} jobs); retry later")
            return
        entry = JobEntry(msg.job, msg.text, voice, msg.speed, msg.priority, msg.client, time.monotonic(),
                         instruct=msg.instruct, prompt_audio=msg.prompt_audio, prompt_text=msg.prompt_text)
        self.sched.enqueue(entry)
        self.counters["accepted"] += 1
        self._send(self.front, route, P.Accepted(msg.job, self.epoch, self.sched.queue_length()).to_frames())

    def _cancel(self, entry: JobEntry, code: str, message: str) -> None:
        self.sched.remove(entry.job)
        self.replay.drop(entry.run)
        self._count("cancelled")
        if entry.running:
            self._send(self.back, entry.worker, P.CancelRun(entry.job, entry.run).to_frames())  # type: ignore[arg-type]
        self._to_client(entry.client, P.JobFailed(entry.job, code, message, entry.run, entry.attempt))

    def _on_replay(self, route: bytes, msg: P.Replay) -> None:
        buf = self.replay.get(msg.run)
        if buf is None or buf.job != msg.job:
            self._send(self.front, route, P.Rejected(msg.job, P.REPLAY_GONE, "that run is no longer in the replay "
                                                     "buffer", run=msg.run).to_frames())
            return
        seqs = msg.seqs or sorted(buf.chunks)
        for seq in seqs[:4096]:
            chunk = buf.chunks.get(seq)
            if chunk is None:
                continue
            self.counters["replayed"] += 1
            self._send(self.front, route, [P.PROTO, P.ReplayChunk.TYPE, chunk[0], chunk[1]])

    # --- workers --------------------------------------------------------------------

    def _on_worker(self, identity: bytes, frames: list[bytes]) -> None:
        msg = P.decode(frames, P.WORKER_MESSAGES)
        now = time.monotonic()
        worker = self.sched.workers.get(identity)
        if isinstance(msg, P.Ready):
            if worker is not None and msg.update:
                worker.info = msg
                worker.last_seen = now
                log.info("worker %s now serves voices %s", msg.worker, ",".join(msg.voices))
                return
            if worker is not None:  # re-registration: whatever it ran is lost
                self._requeue(self.sched.drop_worker(identity), "worker re-registered")
            self.sched.workers[identity] = WorkerEntry(identity, msg, now)
            # An immediate heartbeat acknowledges the registration (the worker reports READY to systemd on it).
            self._send(self.back, identity, P.Heartbeat(epoch=self.epoch).to_frames())
            log.info("worker %s joined: %s/%s on %s, voices %s, capacity %d", msg.worker, msg.engine,
                     msg.model, msg.device, ",".join(msg.voices), msg.capacity)
            return
        if worker is None:
            if not isinstance(msg, P.Disconnect):
                self._send(self.back, identity, P.Reconnect().to_frames())
            return
        worker.last_seen = now
        if isinstance(msg, P.Heartbeat):
            worker.metrics = msg.metrics
        elif isinstance(msg, P.JobDone):
            entry = self.sched.runs.get(msg.run)
            if entry is None or entry.worker != identity:
                return
            self.sched.remove(entry.job)
            worker.jobs_done += 1
            worker.record_done(msg.ttfc_ms, msg.rtf)
            self.counters["done"] += 1
            self.replay.finish(msg.run, entry.job, now)
            ttfc_ms = (entry.first_chunk - entry.started) * 1000 if entry.first_chunk else msg.ttfc_ms
            self.ttfc_ms.append(ttfc_ms)
            del self.ttfc_ms[:-1000]
            if self.metrics:
                self.metrics.observe_done(ttfc_ms, msg.rtf)  # counts "done" too
            self._to_client(entry.client, P.JobDone(
                msg.job, msg.run, msg.attempt, msg.chunks, msg.samples, msg.sample_rate, msg.ttfc_ms, msg.rtf,
                worker.info.worker))
        elif isinstance(msg, P.JobFailed):
            entry = self.sched.runs.get(msg.run)
            if entry is None or entry.worker != identity:
                return
            worker.jobs_failed += 1
            worker.record_failed()
            if msg.code == P.ENGINE_STALLED:
                # The worker exits next to be restarted (PROTOCOL.md): not one of its runs can finish there, and a
                # retry must not go back to it in the moment before its DISCONNECT arrives.
                log.warning("worker %s has a stuck engine: its jobs are requeued", worker.info.worker)
                self._requeue(self.sched.drop_worker(identity), msg.message)
            elif msg.retryable:
                self._requeue([entry], msg.message)
            else:
                self.sched.remove(entry.job)
                self.replay.drop(entry.run)
                self._count("failed")
                self._to_client(entry.client, P.JobFailed(entry.job, msg.code, msg.message, entry.run,
                                                          entry.attempt))
        elif isinstance(msg, P.Disconnect):
            log.info("worker %s left", worker.info.worker)
            self._requeue(self.sched.drop_worker(identity), "worker stopped")

    def _requeue(self, entries: list[JobEntry], reason: str) -> None:
        for entry in entries:
            run, attempt = entry.run, entry.attempt
            self.replay.drop(run)  # that attempt is abandoned: no client keeps it
            if self.sched.retry_or_fail(entry):
                self._count("retried")
                log.info("job %s: attempt %d lost (%s); requeued", entry.job, attempt, reason)
            else:
                self._count("failed")
                self._to_client(entry.client, P.JobFailed(
                    entry.job, P.WORKER_LOST, f"{reason}; gave up after {attempt} attempts", run, attempt))

    def _heartbeat(self, now: float) -> None:
        window = self.config.heartbeat_s * self.config.liveness
        for identity, w in list(self.sched.workers.items()):
            if now - w.last_seen > window:
                log.warning("worker %s missed its heartbeats: declared dead", w.info.worker)
                self._requeue(self.sched.drop_worker(identity), f"worker {w.info.worker} died")
            else:
                self._send(self.back, identity, P.Heartbeat(epoch=self.epoch).to_frames())
        # Jobs of clients that vanished are cancelled, not rendered to nobody.
        gone = {c for c, (_, seen) in self.clients.items() if now - seen > self.config.client_timeout_s}
        if gone:
            for entry in [e for e in self.sched.jobs.values() if e.client in gone]:
                log.info("job %s: client %s is gone; cancelled", entry.job, entry.client)
                self._cancel(entry, P.CLIENT_GONE, "client stopped answering")
            for c in gone:
                route, _ = self.clients.pop(c)
                self.outbox.pop(route, None)
        if self.metrics:
            q = self.sched.queued
            self.metrics.update_queue(q[P.INTERACTIVE], q[P.BULK], len(self.sched.workers))
            self.metrics.update_workers([{"name": w.info.worker, "capacity": w.info.capacity,
                                          "running": len(w.running), "metrics": w.metrics}
                                         for w in self.sched.workers.values()])
        self.replay.expire(now, self.sched.runs)

    def _dispatch(self) -> None:
        unreachable: set[bytes] = set()
        for entry, worker in self.sched.dispatch(self.subscribed):
            if worker.identity in unreachable:
                continue  # requeued with the worker's other runs when the first send to it failed: no ghost JOB
            job = P.Job(entry.job, entry.run, entry.attempt, entry.text, entry.voice, entry.speed, entry.instruct,
                        entry.prompt_audio, entry.prompt_text)
            if not self._send(self.back, worker.identity, job.to_frames()):
                unreachable.add(worker.identity)
                self._requeue(self.sched.drop_worker(worker.identity), "worker unreachable")
                continue
            self._to_client(entry.client, P.Started(entry.job, entry.run, entry.attempt, worker.info.worker))

    # --- status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        ttfc = sorted(self.ttfc_ms)
        workers = []
        for w in self.sched.workers.values():
            i = w.info
            workers.append({
                "name": i.worker, "engine": i.engine, "model": i.model, "device": i.device, "host": i.host,
                "pid": i.pid, "voices": i.voices, "default_voice": i.default_voice, "sample_rate": i.sample_rate,
                "clone": i.clone, "instruct": i.instruct,
                "capacity": i.capacity, "running": len(w.running),
                "state": "busy" if w.running else "idle",
                "jobs_done": w.jobs_done, "jobs_failed": w.jobs_failed,
                "last_seen_ms": round((now - w.last_seen) * 1000, 1), "metrics": w.shown_metrics(),
            })
        return {
            "broker": {"version": __version__, "pid": os.getpid(), "epoch": self.epoch,
                       "uptime_s": round(time.time() - self.started, 1), "endpoints": self.endpoints.as_dict()},
            "queue": dict(self.sched.queued),
            "running": len(self.sched.runs),
            "workers": workers,
            "voices": self.sched.voices(),
            "counters": dict(self.counters),
            "ttfc_ms_p50": ttfc[len(ttfc) // 2] if ttfc else None,
            "replay_buffer_bytes": self.replay.total,
        }


def run_broker(endpoints: Endpoints, config: BrokerConfig) -> int:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker = Broker(endpoints, config)
    broker.run(stop)
    return 0
