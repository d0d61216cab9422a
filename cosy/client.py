"""The broker client used by `cosy say`, `cosy batch` and the gateways.

One DEALER to the broker's front ROUTER and one SUB on its audio XPUB. The client:
- subscribes to a job's topic *before* submitting it (the broker waits for that subscription);
- checks every chunk's sequence number, repairs gaps from the broker's replay buffer, and
  declares a job complete only when the chunk count and sample count of the broker's DONE
  match what it holds: never a silently shorter file;
- keeps only the run (attempt) the broker reports as done, so a worker that died mid-stream
  leaves no partial audio behind;
- pings the broker, notices a restart (new epoch) and resubmits its unfinished jobs under the
  same job ids (the broker treats resubmission as idempotent);
- never blocks on a send: while the broker is away, SUBMIT and CANCEL that the DEALER's queue
  (``sndhwm`` messages) cannot take wait in the client's own backlog, in order, and leave as soon
  as there is room; PING and REPLAY are not kept (the next ones replace them).
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from cosy import protocol as P
from cosy.endpoints import Endpoints
from cosy.security import prepare_client
from cosy.zmqio import try_send

if TYPE_CHECKING:
    import numpy as np
# numpy (~90 ms to import) is imported when the first audio arrives, not before the job is submitted:
# `cosy say` warms it up while the worker synthesizes (see cli/say.py).

PING_S = 1.0
GAP_WAIT_S = 0.15  # how long a gap may stay open before a replay is requested
REPLAY_TRIES = 4


class BrokerUnreachable(ConnectionError):
    pass


def check_client_id(client_id: str) -> bytes:
    """The client id as the DEALER's routing id (PROTOCOL.md, "Routing"); ValueError if it cannot be one."""
    routing_id = client_id.encode()
    if not (1 <= len(client_id) <= 64) or len(routing_id) > 255 or routing_id[:1] == b"\0":
        raise ValueError(f"client id {client_id!r}: 1-64 characters, at most 255 bytes, not starting with NUL")
    return routing_id


@dataclass
class JobSpec:
    """What to synthesize; the job id defaults to a fresh random one."""

    text: str
    voice: str | None = None
    speed: float = 1.0
    priority: str = P.INTERACTIVE
    job: str = field(default_factory=lambda: uuid.uuid4().hex)
    instruct: str = ""
    # The job's own reference voice, for workers that clone (16 kHz mono s16le; PROTOCOL.md, SUBMIT).
    prompt_audio: bytes = field(default=b"", repr=False)
    prompt_text: str = ""


# --- events ---------------------------------------------------------------------------


@dataclass
class Accepted:
    """The broker queued the job."""

    job: str
    queued: int


@dataclass
class Rejected:
    """The broker refused the job (bad input, unknown voice, full queue...)."""

    job: str
    code: str
    message: str
    voices: list[str]


@dataclass
class Started:
    """An attempt of the job started on a worker (attempt > 1: a worker was lost)."""

    job: str
    run: str
    attempt: int
    worker: str


@dataclass
class Audio:
    """In-order audio of the job's current run, for live playback. ``restart`` marks a new attempt.

    ``data`` is the chunk as it arrived (s16le bytes); ``pcm`` the same samples as a numpy array. Writing
    ``data`` to a pipe needs no numpy, which `cosy say -o -` relies on to reach its first audio sooner.
    """

    job: str
    run: str
    attempt: int
    data: bytes  # s16le
    sample_rate: int
    restart: bool

    @property
    def pcm(self) -> np.ndarray:  # int16
        import numpy as np

        return np.frombuffer(self.data, dtype="<i2")


@dataclass
class Completed:
    """The whole audio of the one complete run: ``data`` as s16le bytes, ``audio`` as a numpy view of them."""

    job: str
    data: bytes
    sample_rate: int
    done: P.JobDone
    replayed: int

    @property
    def audio(self) -> np.ndarray:  # int16
        import numpy as np

        return np.frombuffer(self.data, dtype="<i2")

    @property
    def samples(self) -> int:
        return len(self.data) // 2


@dataclass
class Failed:
    """The job failed for good (engine error, workers lost, incomplete audio...)."""

    job: str
    code: str
    message: str


@dataclass
class BrokerRestarted:
    """The broker restarted; the client resubmitted its unfinished jobs."""

    epoch: str
    resubmitted: int


Event = Accepted | Rejected | Started | Audio | Completed | Failed | BrokerRestarted


# --- per-run assembly -----------------------------------------------------------------


@dataclass
class RunAssembly:
    """The chunks of one run (attempt) as they arrive, by sequence number."""

    run: str
    attempt: int
    sample_rate: int = 0
    chunks: dict[int, bytes] = field(default_factory=dict)
    delivered: int = 0  # next seq to hand out in order
    total_chunks: int | None = None
    total_samples: int | None = None
    gap_since: float = 0.0
    replay_asked: float = 0.0
    replay_tries: int = 0
    replayed: int = 0

    def missing(self, upto: int | None = None) -> list[int]:
        end = upto if upto is not None else (self.total_chunks if self.total_chunks is not None
                                             else max(self.chunks, default=-1) + 1)
        return [s for s in range(end) if s not in self.chunks]

    def complete(self) -> bool:
        return self.total_chunks is not None and len(self.chunks) >= self.total_chunks and not self.missing()

    def data(self) -> bytes:
        assert self.total_chunks is not None
        return b"".join(self.chunks[s] for s in range(self.total_chunks))


@dataclass
class JobState:
    """The client's view of one job: its spec, its runs, and the broker's DONE once it came."""

    spec: JobSpec
    accepted: bool = False
    run: str = ""  # the run currently streaming (latest STARTED or first chunk seen)
    attempt: int = 0
    runs: dict[str, RunAssembly] = field(default_factory=dict)
    done: P.JobDone | None = None
    done_at: float = 0.0
    replay_run: str = ""  # the run of the last REPLAY asked (what a REPLAY_GONE from an older broker is about)


class Client:
    def __init__(self, endpoints: Endpoints, ctx: zmq.Context | None = None, client_id: str | None = None,
                 ping_s: float = PING_S, drop_chunk: object = None, rcvhwm: int = 100_000,
                 sndhwm: int = 1000) -> None:
        self.endpoints = endpoints
        self.ctx = ctx or zmq.Context.instance()
        self.client_id = client_id or f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        routing_id = check_client_id(self.client_id)
        self.ping_s = ping_s
        self.jobs: dict[str, JobState] = {}
        self.epoch = ""
        self.last_pong = 0.0
        self._next_ping = 0.0
        self._backlog: deque[list[bytes]] = deque()  # SUBMIT/CANCEL the DEALER's queue could not take, in order
        # Fault injection for tests only: a callable(header) -> bool that drops chunks on arrival.
        self._drop_chunk = drop_chunk
        curve = endpoints.curve_dir if endpoints.secure else None
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        # The client id is the route: a reconnect (a broken connection, a restarted broker) keeps it, so a DONE
        # sent before the client's next PING still reaches it (the front ROUTER has ROUTER_HANDOVER).
        self.dealer.setsockopt(zmq.ROUTING_ID, routing_id)
        self.dealer.setsockopt(zmq.SNDHWM, sndhwm)
        prepare_client(self.dealer, curve)
        self.dealer.connect(endpoints.front)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, rcvhwm)
        prepare_client(self.sub, curve)
        self.sub.connect(endpoints.audio_out)
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

    def close(self) -> None:
        self._flush_backlog()  # what fits now (e.g. the CANCELs of a gateway that stops); the rest is dropped
        self.dealer.close(linger=0)
        self.sub.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------

    def connect(self, timeout_s: float = 5.0) -> str:
        """Wait for the broker to answer a PING; return its epoch or raise BrokerUnreachable."""
        if not self.endpoints.is_tcp:
            path = self.endpoints.front[len("ipc://"):]
            if not os.path.exists(path):
                raise BrokerUnreachable(f"no broker at {self.endpoints.front} (is `cosy up` or cosy-broker running?)")
        deadline = time.monotonic() + timeout_s
        self._ping(time.monotonic())
        while time.monotonic() < deadline:
            self.poll(0.05)
            if self.epoch:
                return self.epoch
        raise BrokerUnreachable(f"the broker at {self.endpoints.front} did not answer within {timeout_s:g} s")

    def submit(self, spec: JobSpec) -> None:
        P.check_job_id(spec.job)
        self.sub.setsockopt(zmq.SUBSCRIBE, P.topic(spec.job))
        self.jobs[spec.job] = JobState(spec)
        self._send_submit(spec)

    def _send_submit(self, spec: JobSpec) -> None:
        msg = P.Submit(spec.job, spec.text, self.client_id, spec.voice, spec.speed, spec.priority, spec.instruct,
                       spec.prompt_audio, spec.prompt_text)
        self._send(msg.to_frames(), keep=True)

    def cancel(self, job: str) -> None:
        if job in self.jobs:
            self._send(P.Cancel(job, self.client_id).to_frames(), keep=True)

    def backlog(self) -> int:
        """Messages waiting for room in the DEALER's queue (the broker is away or not reading)."""
        return len(self._backlog)

    def _send(self, frames: list[bytes], keep: bool) -> bool:
        """Send without blocking; what cannot go now is kept for later (``keep``) or dropped. True if it went."""
        if not self._backlog and try_send(self.dealer, frames):
            return True
        if keep:
            self._backlog.append(frames)
        return False

    def _flush_backlog(self) -> None:
        while self._backlog and try_send(self.dealer, self._backlog[0]):
            self._backlog.popleft()

    def forget(self, job: str) -> None:
        if self.jobs.pop(job, None) is not None:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, P.topic(job))

    def pending(self) -> int:
        return len(self.jobs)

    # --- event loop -----------------------------------------------------------------

    def poll(self, timeout_s: float) -> list[Event]:
        """Wait up to timeout_s for something to happen; return what happened."""
        events: list[Event] = []
        now = time.monotonic()
        self._flush_backlog()
        if now >= self._next_ping:
            self._ping(now)
        ready = dict(self.poller.poll(max(0, timeout_s) * 1000))
        if self.sub in ready:
            for _ in range(2000):
                try:
                    frames = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 3:
                    self._on_chunk(frames[1], frames[2], events)
        if self.dealer in ready:
            for _ in range(2000):
                try:
                    frames = self.dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_control(frames, events)
        self._check_runs(time.monotonic(), events)
        return events

    def _ping(self, now: float) -> None:
        self._send(P.Ping(self.client_id).to_frames(), keep=False)
        self._next_ping = now + self.ping_s

    def _on_control(self, frames: list[bytes], events: list[Event]) -> None:
        if len(frames) == 4 and frames[0] == P.PROTO and frames[1] == P.ReplayChunk.TYPE:
            self._on_chunk(frames[2], frames[3], events, replayed=True)
            return
        try:
            msg = P.decode(frames, P.BROKER_TO_CLIENT)
        except P.ProtocolError:
            return
        if isinstance(msg, P.Pong):
            self.last_pong = time.monotonic()
            self._check_epoch(msg.epoch, events)
            return
        state = self.jobs.get(getattr(msg, "job", ""))
        if state is None:
            return
        if isinstance(msg, P.Accepted):
            self._check_epoch(msg.epoch, events)
            if not state.accepted:
                state.accepted = True
                events.append(Accepted(msg.job, msg.queued))
        elif isinstance(msg, P.Rejected):
            if msg.code == P.REPLAY_GONE:
                self._on_replay_gone(state, msg.run or state.replay_run, events)
            else:
                self._fail(state, msg.code, msg.message, events, msg.voices)
        elif isinstance(msg, P.Started):
            state.run, state.attempt = msg.run, msg.attempt
            state.runs.setdefault(msg.run, RunAssembly(msg.run, msg.attempt))
            for old in [r for r in state.runs if r != msg.run]:
                del state.runs[old]
            events.append(Started(msg.job, msg.run, msg.attempt, msg.worker))
        elif isinstance(msg, P.JobDone):
            state.done = msg
            state.done_at = time.monotonic()
            asm = state.runs.setdefault(msg.run, RunAssembly(msg.run, msg.attempt))
            asm.total_chunks, asm.total_samples = msg.chunks, msg.samples
            asm.sample_rate = asm.sample_rate or msg.sample_rate
            self._maybe_complete(state, events)
        elif isinstance(msg, P.JobFailed):
            self._fail(state, msg.code, msg.message, events)

    def _on_replay_gone(self, state: JobState, run: str, events: list[Event]) -> None:
        """The broker no longer holds RUN's chunks. That is final only for the run its DONE named; any other run was
        abandoned (its worker died: a new attempt follows) or is still going (its DONE decides)."""
        if state.done is not None and state.done.run == run:
            self._fail(state, "INCOMPLETE_AUDIO", "audio chunks were lost and the broker no longer holds them", events)
            return
        asm = state.runs.get(run)
        if asm is not None:
            asm.replay_tries = REPLAY_TRIES  # nothing more to ask; should its DONE come with the hole, the job fails

    def _check_epoch(self, epoch: str, events: list[Event]) -> None:
        if self.epoch and epoch != self.epoch:
            # The broker restarted: what it had is gone. Resubmit every unfinished job.
            for state in self.jobs.values():
                state.accepted = False
                state.run = ""
                state.runs.clear()
                state.done = None
                self._send_submit(state.spec)
            events.append(BrokerRestarted(epoch, len(self.jobs)))
        self.epoch = epoch

    def _fail(self, state: JobState, code: str, message: str, events: list[Event],
              voices: list[str] | None = None) -> None:
        job = state.spec.job
        self.forget(job)
        if voices is not None or code in (P.BUSY, P.BAD_REQUEST, P.TEXT_TOO_LONG, P.UNKNOWN_VOICE,
                                          P.DUPLICATE_JOB, P.SHUTTING_DOWN):
            events.append(Rejected(job, code, message, voices or []))
        else:
            events.append(Failed(job, code, message))

    def _on_chunk(self, hbytes: bytes, pcm: bytes, events: list[Event], replayed: bool = False) -> None:
        try:
            h = P.ChunkHeader.unpack(hbytes)
        except P.ProtocolError:
            return
        state = self.jobs.get(h.job)
        if state is None or h.format != "s16le" or h.channels != 1 or len(pcm) % 2:
            return
        if not replayed and self._drop_chunk is not None and self._drop_chunk(h):
            return
        if state.done is not None and h.run != state.done.run:
            return  # a stale attempt
        asm = state.runs.get(h.run)
        if asm is None:
            if h.attempt < state.attempt:
                return
            asm = state.runs[h.run] = RunAssembly(h.run, h.attempt)
            state.run, state.attempt = h.run, h.attempt
        if h.seq in asm.chunks:
            return
        asm.sample_rate = h.sample_rate
        asm.chunks[h.seq] = pcm
        if replayed:
            asm.replayed += 1
        if h.final:
            asm.total_chunks, asm.total_samples = h.total_chunks, h.total_samples
        if h.run == state.run:
            restart = asm.delivered == 0
            while asm.delivered in asm.chunks:
                data = asm.chunks[asm.delivered]
                if data:
                    events.append(Audio(h.job, h.run, asm.attempt, data, asm.sample_rate,
                                        restart and asm.delivered == 0))
                asm.delivered += 1
        self._maybe_complete(state, events)

    def _maybe_complete(self, state: JobState, events: list[Event]) -> None:
        done = state.done
        if done is None:
            return
        asm = state.runs.get(done.run)
        if asm is None or not asm.complete():
            return
        data = asm.data()
        samples = len(data) // 2
        if samples != done.samples or asm.total_chunks != done.chunks:
            self._fail(state, "INCOMPLETE_AUDIO",
                       f"assembled {samples} samples in {len(asm.chunks)} chunks, "
                       f"broker reported {done.samples} in {done.chunks}", events)
            return
        self.forget(state.spec.job)
        events.append(Completed(state.spec.job, data, asm.sample_rate or done.sample_rate, done, asm.replayed))

    def _check_runs(self, now: float, events: list[Event]) -> None:
        for state in list(self.jobs.values()):
            for asm in state.runs.values():
                if state.done is not None and asm.run != state.done.run:
                    continue
                known_end = asm.total_chunks if asm.total_chunks is not None else None
                missing = asm.missing(known_end)
                if not missing:
                    asm.gap_since = 0.0
                    continue
                if not asm.gap_since:
                    asm.gap_since = now
                    continue
                if now - asm.gap_since < GAP_WAIT_S or now - asm.replay_asked < 0.5:
                    continue
                if asm.replay_tries >= REPLAY_TRIES:
                    if state.done is None:
                        continue  # a run still going, or abandoned for a new attempt: its DONE (or theirs) decides
                    self._fail(state, "INCOMPLETE_AUDIO",
                               f"chunks {missing[:8]} of attempt {asm.attempt} never arrived", events)
                    break
                asm.replay_asked = now
                state.replay_run = asm.run
                if self._send(P.Replay(state.spec.job, asm.run, missing[:4096]).to_frames(), keep=False):
                    asm.replay_tries += 1
