"""A closed loop of N jobs in flight, timed per job: submit -> first chunk, submit -> done.

Two clients with one interface: cosy's own Client, and a bare DEALER+SUB pair for the floors.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq

TEXT = "Hello there, general."  # 21 characters: 420 ms of tone in 5 chunks of 100 ms, plus the final chunk


class LoopClient(Protocol):
    def submit(self, job: str) -> None: ...
    def poll(self, timeout_s: float) -> list[tuple[str, str]]:  # (kind "first"|"done"|"failed", job)
        ...
    def close(self) -> None: ...


class CosyLoopClient:
    def __init__(self, runtime_dir: Path, text: str = TEXT) -> None:
        from cosy.client import Client
        from cosy.endpoints import ipc_endpoints

        self.client = Client(ipc_endpoints(runtime_dir))
        self.client.connect(10)
        self.text = text
        self._seen: set[str] = set()

    def submit(self, job: str) -> None:
        from cosy.client import JobSpec

        self.client.submit(JobSpec(self.text, job=job))

    def on_completed(self, event: Any) -> None:
        """A job's whole audio arrived (a cosy.client.Completed); subclasses may look at it."""

    def poll(self, timeout_s: float) -> list[tuple[str, str]]:
        from cosy.client import Audio, Completed, Failed, Rejected

        out = []
        for ev in self.client.poll(timeout_s):
            if isinstance(ev, Audio):
                if ev.job not in self._seen:
                    self._seen.add(ev.job)
                    out.append(("first", ev.job))
            elif isinstance(ev, Completed):
                self._seen.discard(ev.job)
                self.on_completed(ev)
                out.append(("done", ev.job))
            elif isinstance(ev, (Failed, Rejected)):
                self._seen.discard(ev.job)
                out.append(("failed", ev.job))
        return out

    def close(self) -> None:
        self.client.close()


class BareLoopClient:
    """DEALER to a floor's front, SUB on its audio: subscribe, then send the job id.

    A job is done when all its `messages` (chunks and the final one) arrived, as cosy's client completes a job
    only with all its audio: the floor's reply on the DEALER travels on another connection and can overtake
    the chunks, which would end the job before its first chunk is counted (at 64 streams, every job did).
    """

    def __init__(self, runtime_dir: Path, messages: int) -> None:
        self.messages = messages
        self._count: dict[bytes, int] = {}
        ctx = zmq.Context.instance()
        d = Path(runtime_dir).absolute()
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(f"ipc://{d}/front.sock")
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        self.sub.connect(f"ipc://{d}/audio.sock")
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.sub, zmq.POLLIN)

    def submit(self, job: str) -> None:
        self.sub.setsockopt(zmq.SUBSCRIBE, job.encode() + b"\0")
        self.dealer.send(job.encode())

    def poll(self, timeout_s: float) -> list[tuple[str, str]]:
        out = []
        ready = dict(self.poller.poll(timeout_s * 1000))
        if self.sub in ready:
            while True:
                try:
                    topic, _h, _pcm = self.sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                n = self._count.get(topic, 0) + 1
                if n == 1:
                    out.append(("first", topic[:-1].decode()))
                if n == self.messages:
                    del self._count[topic]
                    self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
                    out.append(("done", topic[:-1].decode()))
                else:
                    self._count[topic] = n
        if self.dealer in ready:
            while True:  # the floor's replies: drained, not needed (see the class's note)
                try:
                    self.dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
        return out

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.sub.close(linger=0)


@dataclass
class LoopResult:
    ttfc_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    failed: int = 0
    elapsed_s: float = 0.0

    @property
    def jobs_per_s(self) -> float:
        return len(self.total_s) / self.elapsed_s if self.elapsed_s else 0.0


def closed_loop(client: LoopClient, concurrency: int, jobs: int, max_s: float, warmup: int = 0) -> LoopResult:
    """Keep `concurrency` jobs in flight until `jobs` are done (or max_s passes); the first `warmup` are not
    counted."""
    res = LoopResult()
    started: dict[str, float] = {}
    submitted = 0
    finished = 0
    t0 = time.perf_counter()
    t_measure = t0
    deadline = time.monotonic() + max_s
    prefix = uuid.uuid4().hex[:8]
    while finished < jobs + warmup and time.monotonic() < deadline:
        while len(started) < concurrency and submitted < jobs + warmup:
            job = f"{prefix}-{submitted}"
            started[job] = time.perf_counter()
            client.submit(job)
            submitted += 1
        for kind, job in client.poll(0.5):
            t = time.perf_counter()
            t_sub = started.get(job)
            if t_sub is None:
                continue
            counted = int(job.rsplit("-", 1)[1]) >= warmup
            if kind == "first":
                if counted:
                    res.ttfc_s.append(t - t_sub)
                continue
            del started[job]
            finished += 1
            if finished == warmup:
                t_measure = t
            if not counted:
                continue
            if kind == "done":
                res.total_s.append(t - t_sub)
            else:
                res.failed += 1
    res.elapsed_s = time.perf_counter() - t_measure
    return res
