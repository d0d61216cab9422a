"""One long request as sentence jobs across the workers, streamed back as one job, in order: the gateways'
asyncio adapter over :class:`cosy.segments.OrderedMerge` (the splitter and the merge themselves, shared with
`cosy say`, live there).

A long text sent as one job runs on one worker, at that worker's speed: with CosyVoice on its eager
path (real-time factor about 2 on an H100, docs/performance.md) a listener would hear gaps. Split into
sentence jobs (:func:`cosy.segments.split_text`), the next sentences synthesize on other workers while the
first one plays:

- the first segment is the first sentence alone (its audio starts the response);
- later segments are whole sentences grouped up to ``max_chars``;
- at most one segment per connected worker is in flight from the head on, and the others wait until the
  first one sounds, so the first sentence does not share a worker with the second while another worker is
  free. With one worker there is nothing to gain (one job already streams sentence by sentence, the next
  synthesized while the last plays), so the gateway does not split.

:class:`SegmentedJob` is a :class:`~cosy.gateways.bridge.JobEvents` like one job's handle: one queue of
events (Audio in order, then one Completed, or one Failed/Rejected), and one ``cancel()``. Its audio is all in
the Audio events; the Completed carries none (``data`` is empty, so the document is never held in memory) and
its ``done`` has the totals (``done.samples`` for every part together).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cosy import protocol as P
from cosy.client import Audio, BrokerRestarted, Completed, Event, Failed, JobSpec, Rejected
from cosy.gateways.bridge import TERMINAL, JobEvents
from cosy.segments import MergeDone, MergeFailed, OrderedMerge, PartAudio, split_text

__all__ = ["SegmentedJob", "split_text", "start_segmented"]


@dataclass(eq=False)
class SegmentedJob(JobEvents):
    """Several jobs streamed as one. Create with :func:`start_segmented`; read and cancel it as any
    :class:`~cosy.gateways.bridge.JobEvents`."""

    job: str
    merge: OrderedMerge
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    finished: bool = False
    handles: dict[str, JobEvents] = field(default_factory=dict)  # the parts running now, by job id
    task: asyncio.Task[None] | None = None

    def _stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for handle in self.handles.values():  # a part that already ended ignores it
            handle.cancel()


def start_segmented(spec: JobSpec, texts: list[str], submit: Callable[[JobSpec], JobEvents],
                    window: int) -> SegmentedJob:
    """Submit ``texts`` as parts of ``spec`` (``submit`` returns a JobHandle), at most ``window`` from the head
    on, and merge their events."""
    merge = OrderedMerge(spec.job, window=window)
    for text in texts:
        merge.add(text)
    merge.close()
    seg = SegmentedJob(spec.job, merge)
    seg.task = asyncio.get_running_loop().create_task(_run(seg, spec, submit))
    return seg


async def _pump(handle: JobEvents, into: asyncio.Queue[Event]) -> None:
    """One part's events into the merge's queue, until its terminal event."""
    while True:
        ev = await handle.next_event()
        into.put_nowait(ev)
        if isinstance(ev, TERMINAL):
            return


async def _run(seg: SegmentedJob, spec: JobSpec, submit: Callable[[JobSpec], JobEvents]) -> None:
    merge, out = seg.merge, seg.events
    inbox: asyncio.Queue[Event] = asyncio.Queue()
    pumps: set[asyncio.Task[None]] = set()
    restarted = False
    try:
        while True:
            for sub in merge.submissions(time.monotonic()):
                try:
                    handle = submit(dataclasses.replace(spec, text=sub.text, job=sub.job))
                except RuntimeError as exc:  # the gateway is stopping
                    out.put_nowait(Failed(seg.job, P.SHUTTING_DOWN, str(exc)))
                    return
                seg.handles[sub.job] = handle
                pump = asyncio.create_task(_pump(handle, inbox))
                pumps.add(pump)
                pump.add_done_callback(pumps.discard)
            for item in merge.take():
                if isinstance(item, PartAudio):
                    out.put_nowait(Audio(seg.job, "", item.attempt, item.data, item.sample_rate, item.restart))
                elif isinstance(item, MergeDone):
                    out.put_nowait(Completed(seg.job, b"", item.done.sample_rate, item.done, item.replayed))
                    return
                elif isinstance(item, MergeFailed):
                    for job in merge.abandon():
                        handle = seg.handles.pop(job, None)
                        if handle is not None:
                            handle.cancel()
                    out.put_nowait(Rejected(seg.job, item.code, item.message, item.voices) if item.rejected
                                   else Failed(seg.job, item.code, f"{item.where}: {item.message}"))
                    return
            due = merge.next_due()
            timeout = None if due is None else max(0.0, due - time.monotonic())
            try:
                ev = await asyncio.wait_for(inbox.get(), timeout)
            except asyncio.TimeoutError:
                for job in merge.expire(time.monotonic()):
                    handle = seg.handles.pop(job, None)
                    if handle is not None:
                        handle.cancel()
                continue
            if isinstance(ev, BrokerRestarted):
                if not restarted:  # every part's handle reports it: once is enough
                    restarted = True
                    out.put_nowait(ev)
                continue
            job = getattr(ev, "job", "")
            merge.feed(ev, time.monotonic())
            if isinstance(ev, TERMINAL):
                seg.handles.pop(job, None)
    finally:
        for pump in list(pumps):
            pump.cancel()
