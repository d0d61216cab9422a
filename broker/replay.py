"""The broker's replay buffer: each run's chunks, kept to repair what PUB/SUB dropped, within one byte budget.

- A run's chunks are kept while it runs and for ``ttl_s`` after its DONE; a run that will not finish (cancelled,
  failed, requeued after its worker died) loses them at once.
- Over the budget, finished runs go first (the first finished, first), then running ones (the oldest first): the
  short jobs that finished while a long one runs never push the long one's chunks out ahead of their own.
- Apart from the chunks, each finished run is remembered (run -> job) for ``ttl_s``: a chunk that its run's DONE
  overtook (DONE comes on the back socket, chunks on audio-in) is still forwarded, with no buffer at all
  (``--replay-buffer-mb 0``) or after the run's chunks were evicted.

Plain data, no sockets: the broker's loop calls it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from cosy import protocol as P

MAX_ENDED = 100_000  # finished runs remembered for their late chunks (about 100 bytes each)


@dataclass
class ReplayBuffer:
    job: str
    chunks: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # seq -> (header frame, PCM frame)
    nbytes: int = 0
    finished: float = 0.0  # when the run's DONE came (0: still running)


class ReplayStore:
    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.running: OrderedDict[str, ReplayBuffer] = OrderedDict()  # run -> buffer, by first chunk
        self.finished: OrderedDict[str, ReplayBuffer] = OrderedDict()  # run -> buffer, by DONE
        self.ended: OrderedDict[str, tuple[str, float]] = OrderedDict()  # run -> (job, DONE time), by DONE
        self.total = 0

    def get(self, run: str) -> ReplayBuffer | None:
        return self.running.get(run) or self.finished.get(run)

    def late_job(self, run: str) -> str | None:
        """The job of a run that finished less than ``ttl_s`` ago (its late chunks are still wanted)."""
        ended = self.ended.get(run)
        return ended[0] if ended else None

    def add(self, header: P.ChunkHeader, hframe: Any, pframe: Any, now: float) -> None:
        buf = self.get(header.run)
        if buf is None:
            if header.run in self.ended:  # a late chunk of a run whose chunks were evicted
                buf = self.finished[header.run] = ReplayBuffer(header.job, finished=now)
            else:
                buf = self.running[header.run] = ReplayBuffer(header.job)
        n = len(pframe) + len(hframe)
        buf.chunks[header.seq] = (hframe, pframe)
        buf.nbytes += n
        self.total += n
        self._fit()

    def finish(self, run: str, job: str, now: float) -> None:
        """The run's DONE came: keep its chunks ``ttl_s`` more, and forward its late ones."""
        buf = self.running.pop(run, None) or ReplayBuffer(job)
        buf.finished = now
        self.finished[run] = buf
        self.ended[run] = (job, now)
        while len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)
        self._fit()

    def drop(self, run: str) -> None:
        """The run will not finish: its chunks are of no use."""
        buf = self.running.pop(run, None) or self.finished.pop(run, None)
        if buf is not None:
            self.total -= buf.nbytes

    def expire(self, now: float, running: Container[str]) -> None:
        """Finished runs after the TTL; buffers of runs that no longer run and never finished, at once."""
        while self.finished and now - next(iter(self.finished.values())).finished > self.ttl_s:
            _, buf = self.finished.popitem(last=False)
            self.total -= buf.nbytes
        while self.ended and now - next(iter(self.ended.values()))[1] > self.ttl_s:
            self.ended.popitem(last=False)
        for run in [r for r in self.running if r not in running]:
            self.drop(run)

    def _fit(self) -> None:
        while self.total > self.max_bytes and (self.finished or self.running):
            _, buf = (self.finished or self.running).popitem(last=False)
            self.total -= buf.nbytes
