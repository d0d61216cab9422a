"""Job queues and the worker table: which job goes to which worker, and when.

Plain data, no sockets: the broker loop feeds it events and sends what it decides.
- Two priority classes; interactive is always served before bulk.
- Within a class, clients take turns (round robin), so one big batch cannot starve another.
- A job goes only to a worker that serves its voice and has a free slot, and only once
  its client has subscribed to the job's audio (or the subscription wait has expired).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from cosy import protocol as P

SCAN_DEPTH = 64  # queued jobs looked at per client when the head job cannot be placed


@dataclass
class JobEntry:
    job: str
    text: str
    voice: str | None
    speed: float
    priority: str
    client: str
    submitted: float
    instruct: str = ""
    prompt_audio: bytes = b""  # the job's own reference voice: only workers that clone take it
    prompt_text: str = ""
    attempt: int = 0
    run: str = ""
    worker: bytes | None = None
    started: float = 0.0
    first_chunk: float = 0.0
    # Workers that lost or failed this job: a retry goes elsewhere when another worker can take it.
    avoid: set[bytes] = field(default_factory=set)

    @property
    def running(self) -> bool:
        return self.worker is not None


@dataclass
class WorkerEntry:
    identity: bytes
    info: P.Ready
    last_seen: float
    running: set[str] = field(default_factory=set)  # run ids
    metrics: dict = field(default_factory=dict)
    jobs_done: int = 0
    jobs_failed: int = 0

    @property
    def free(self) -> int:
        return self.info.capacity - len(self.running)

    def record_done(self, ttfc_ms: float, rtf: float) -> None:
        """A DONE from this worker: its figures (the worker's own, over its lifetime, as its heartbeats carry them)
        take the job in at once instead of at the next heartbeat, which then replaces them with the same."""
        m = self.metrics
        n = int(m.get("jobs_done") or 0)
        for key, value, digits in (("mean_ttfc_ms", ttfc_ms, 2), ("mean_rtf", rtf, 4)):
            mean = m.get(key) if n else None
            m[key] = round(value if mean is None else (mean * n + value) / (n + 1), digits)
        m["jobs_done"] = n + 1

    def record_failed(self) -> None:
        self.metrics["jobs_failed"] = int(self.metrics.get("jobs_failed") or 0) + 1

    def shown_metrics(self) -> dict:
        """The metrics for `cosy status`: a figure not known yet (no job done) is None, never 0."""
        m = {"mean_ttfc_ms": None, "mean_rtf": None, **self.metrics}
        if not m.get("jobs_done"):
            m["mean_ttfc_ms"] = m["mean_rtf"] = None
        return m

    def serves(self, voice: str | None, clone: bool = False) -> bool:
        if clone:
            return self.info.clone
        return voice is None or voice in self.info.voices


class Scheduler:
    def __init__(self, max_queue: int = 20_000, max_attempts: int = 3, subscribe_wait_s: float = 2.0) -> None:
        self.max_queue = max_queue
        self.max_attempts = max_attempts
        self.subscribe_wait_s = subscribe_wait_s
        self.jobs: dict[str, JobEntry] = {}
        self.runs: dict[str, JobEntry] = {}
        self.workers: dict[bytes, WorkerEntry] = {}
        self.queues: dict[str, OrderedDict[str, deque[JobEntry]]] = {p: OrderedDict() for p in P.PRIORITIES}
        self.queued = {p: 0 for p in P.PRIORITIES}

    # --- queue ----------------------------------------------------------------------

    def queue_length(self) -> int:
        return sum(self.queued.values())

    def voices(self) -> list[str]:
        return sorted({v for w in self.workers.values() for v in w.info.voices})

    def enqueue(self, entry: JobEntry, front: bool = False) -> None:
        self.jobs[entry.job] = entry
        per_client = self.queues[entry.priority].setdefault(entry.client, deque())
        if front:
            per_client.appendleft(entry)
        else:
            per_client.append(entry)
        self.queued[entry.priority] += 1

    def _unqueue(self, entry: JobEntry) -> bool:
        per_client = self.queues[entry.priority].get(entry.client)
        if per_client is None:
            return False
        try:
            per_client.remove(entry)
        except ValueError:
            return False
        self.queued[entry.priority] -= 1
        if not per_client:
            del self.queues[entry.priority][entry.client]
        return True

    def remove(self, job: str) -> JobEntry | None:
        """Forget a job (cancelled, done or failed). Returns it, still marked with its worker."""
        entry = self.jobs.pop(job, None)
        if entry is None:
            return None
        if entry.running:
            self.runs.pop(entry.run, None)
            w = self.workers.get(entry.worker)  # type: ignore[arg-type]
            if w:
                w.running.discard(entry.run)
        else:
            self._unqueue(entry)
        return entry

    # --- dispatch -------------------------------------------------------------------

    def dispatch(self, subscribed: set[bytes], now: float | None = None) -> list[tuple[JobEntry, WorkerEntry]]:
        """Place as many queued jobs as free worker slots allow."""
        now = time.monotonic() if now is None else now
        placed: list[tuple[JobEntry, WorkerEntry]] = []
        while any(w.free > 0 for w in self.workers.values()):
            pick = self._pick(subscribed, now)
            if pick is None:
                break
            entry, worker = pick
            self._unqueue(entry)
            entry.attempt += 1
            entry.run = uuid.uuid4().hex[:16]
            entry.worker = worker.identity
            entry.started = now
            entry.first_chunk = 0.0
            worker.running.add(entry.run)
            self.runs[entry.run] = entry
            placed.append((entry, worker))
        return placed

    def _pick(self, subscribed: set[bytes], now: float) -> tuple[JobEntry, WorkerEntry] | None:
        for priority in P.PRIORITIES:
            clients = self.queues[priority]
            for client in list(clients):
                for i, entry in enumerate(clients[client]):
                    if i >= SCAN_DEPTH:
                        break
                    if P.topic(entry.job) not in subscribed and now - entry.submitted < self.subscribe_wait_s:
                        continue
                    worker = self._best_worker(entry.voice, entry.avoid, bool(entry.prompt_audio))
                    if worker is not None:
                        clients.move_to_end(client)  # the next pick starts with another client
                        return entry, worker
        return None

    def _best_worker(self, voice: str | None, avoid: set[bytes] = frozenset(),  # type: ignore[assignment]
                     clone: bool = False) -> WorkerEntry | None:
        """The least loaded free worker for the voice, preferring one that has not failed this job."""
        best: WorkerEntry | None = None
        best_key: tuple[bool, float] = (False, -1.0)
        for w in self.workers.values():
            if w.free > 0 and w.serves(voice, clone):
                key = (w.identity not in avoid, w.free / w.info.capacity)
                if best is None or key > best_key:
                    best, best_key = w, key
        if best is not None and best.identity in avoid and self._others_could_serve(voice, avoid, clone):
            return None  # wait for a worker that has not failed it
        return best

    def _others_could_serve(self, voice: str | None, avoid: set[bytes], clone: bool = False) -> bool:
        return any(w.serves(voice, clone) and w.identity not in avoid for w in self.workers.values())

    def can_clone(self) -> bool:
        return any(w.info.clone for w in self.workers.values())

    # --- worker failures ------------------------------------------------------------

    def retry_or_fail(self, entry: JobEntry) -> bool:
        """Take a run back from its worker. True if the job was requeued, False if it is out of attempts."""
        self.runs.pop(entry.run, None)
        w = self.workers.get(entry.worker)  # type: ignore[arg-type]
        if w:
            w.running.discard(entry.run)
        if entry.worker is not None:
            entry.avoid.add(entry.worker)
        entry.worker = None
        entry.run = ""
        if entry.attempt >= self.max_attempts:
            self.jobs.pop(entry.job, None)
            return False
        entry.submitted = min(entry.submitted, time.monotonic() - self.subscribe_wait_s)
        self.enqueue(entry, front=True)
        return True

    def drop_worker(self, identity: bytes) -> list[JobEntry]:
        """Remove a worker; return the jobs it was running."""
        w = self.workers.pop(identity, None)
        if w is None:
            return []
        return [self.runs[r] for r in list(w.running) if r in self.runs]
