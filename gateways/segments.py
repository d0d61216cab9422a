"""One long request as sentence jobs across the workers, streamed back as one job, in order.

A long text sent as one job runs on one worker, at that worker's speed: with CosyVoice on its eager
path (real-time factor about 2 on an H100, docs/performance.md) a listener would hear gaps. Split into
sentence jobs, the next sentences synthesize on other workers while the first one plays. The split:

- the first segment is the first sentence alone (its audio starts the response);
- later segments are whole sentences grouped up to ``max_chars``;
- at most one segment per connected worker is in flight, and the next one is submitted when the
  previous one's first audio arrived, so the first sentence does not share a worker with the second
  while another worker is free. With one worker there is nothing to gain (one job already streams
  sentence by sentence, the next synthesized while the last plays), so the gateway does not split.

:class:`SegmentedJob` is a :class:`~cosy.gateways.bridge.JobEvents` like one job's handle: one queue of
events (Audio in order, then one Completed, or one Failed/Rejected), and one ``cancel()``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from cosy import protocol as P
from cosy.client import Audio, BrokerRestarted, Completed, Event, Failed, JobSpec, Rejected
from cosy.gateways.bridge import JobEvents

# A sentence ends at . ! ? … (and their CJK forms) plus any closing quotes or brackets, then space; or at a
# blank line.
SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*\s+|\n\s*\n")
MAX_SEGMENT_CHARS = 400
MIN_SENTENCE_CHARS = 16  # shorter pieces ("Dr.", "e.g.", "No.") join the next one instead of ending a segment


class SentenceSplitter:
    """Cuts streamed text into sentences as soon as each one is complete (the Wyoming gateway's streaming
    input); :func:`split_text` cuts a whole text with it."""

    def __init__(self) -> None:
        self._buffer = ""

    def add(self, text: str) -> list[str]:
        self._buffer += text
        out: list[str] = []
        while True:
            match = SENTENCE_END.search(self._buffer)
            if match is None:
                return out
            sentence = self._buffer[:match.end()].strip()
            self._buffer = self._buffer[match.end():]
            if sentence:
                out.append(sentence)

    def finish(self) -> str:
        rest, self._buffer = self._buffer.strip(), ""
        return rest


def split_text(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Whole sentences in order: the first alone, the rest grouped up to max_chars. Nothing is dropped:
    joining the segments with single spaces gives the text with its runs of whitespace between sentences
    collapsed."""
    splitter = SentenceSplitter()
    pieces = [*splitter.add(text), splitter.finish()]
    sentences: list[str] = []
    carry = ""
    for piece in pieces:
        piece = f"{carry} {piece}".strip() if carry else piece
        if len(piece) < MIN_SENTENCE_CHARS:
            carry = piece
            continue
        sentences.append(piece)
        carry = ""
    if carry:
        if sentences:
            sentences[-1] = f"{sentences[-1]} {carry}"
        else:
            sentences.append(carry)
    if len(sentences) <= 1:
        return [text.strip()] if text.strip() else []
    segments = [sentences[0]]
    current = ""
    for sentence in sentences[1:]:
        if current and len(current) + 1 + len(sentence) > max_chars:
            segments.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        segments.append(current)
    return segments


@dataclass(eq=False)
class SegmentedJob(JobEvents):
    """Several jobs streamed as one. Create with :func:`start_segmented`; read and cancel it as any
    :class:`~cosy.gateways.bridge.JobEvents`."""

    job: str
    parts: list[JobSpec]
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    finished: bool = False
    handles: list[JobEvents] = field(default_factory=list)  # the parts submitted so far
    task: asyncio.Task[None] | None = None

    def _stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for handle in self.handles:  # a part that already ended ignores it
            handle.cancel()


def start_segmented(job: str, specs: list[JobSpec], submit: Callable[[JobSpec], JobEvents],
                    window: int) -> SegmentedJob:
    """Submit the parts (``submit`` returns a JobHandle) at most ``window`` ahead, and merge their events."""
    seg = SegmentedJob(job, specs)
    seg.task = asyncio.get_running_loop().create_task(_merge(seg, submit, max(1, window)))
    return seg


async def _merge(seg: SegmentedJob, submit: Callable[[JobSpec], JobEvents], window: int) -> None:
    out = seg.events
    datas: list[bytes] = []
    dones: list[P.JobDone] = []
    replayed = 0
    restarted = False

    def submit_upto(n: int) -> bool:
        try:
            while len(seg.handles) < min(n, len(seg.parts)):
                seg.handles.append(submit(seg.parts[len(seg.handles)]))
        except RuntimeError as exc:  # the gateway is stopping
            fail(P.SHUTTING_DOWN, str(exc))
            return False
        return True

    def fail(code: str, message: str, rejected: Rejected | None = None) -> None:
        for handle in seg.handles:
            handle.cancel()
        out.put_nowait(Rejected(seg.job, code, message, rejected.voices) if rejected
                       else Failed(seg.job, code, message))

    if not submit_upto(1):
        return
    for i in range(len(seg.parts)):
        handle = seg.handles[i]
        emitted = False
        while True:
            ev = await handle.next_event()
            if isinstance(ev, Audio):
                if dones and ev.sample_rate != dones[0].sample_rate:
                    fail(P.ENGINE_ERROR, f"sentence {i + 1} came at {ev.sample_rate} Hz, the first at "
                                         f"{dones[0].sample_rate} Hz: serve this voice from one kind of worker")
                    return
                if not emitted and not submit_upto(i + window):  # this part sounds: start the next ones
                    return
                # A part's first audio starts the merged stream only once; a new attempt after some of
                # this part's audio went out is a real restart, which the gateway cannot take back.
                restart = ev.restart and (emitted or i == 0)
                emitted = True
                out.put_nowait(Audio(seg.job, ev.run, ev.attempt, ev.data, ev.sample_rate, restart))
            elif isinstance(ev, Completed):
                datas.append(ev.data)
                dones.append(ev.done)
                replayed += ev.replayed
                if not submit_upto(i + 1 + window):
                    return
                break
            elif isinstance(ev, Failed):
                fail(ev.code, f"sentence {i + 1} of {len(seg.parts)}: {ev.message}")
                return
            elif isinstance(ev, Rejected):
                fail(ev.code, ev.message, rejected=ev)
                return
            elif isinstance(ev, BrokerRestarted) and not restarted:
                restarted = True
                out.put_nowait(ev)
    data = b"".join(datas)
    first, rate = dones[0], dones[0].sample_rate
    seconds = len(data) / 2 / rate if rate else 0.0
    compute = sum(d.rtf * d.samples / d.sample_rate for d in dones if d.sample_rate)
    workers = ",".join(dict.fromkeys(d.worker for d in dones))
    done = P.JobDone(seg.job, first.run, max(d.attempt for d in dones), sum(d.chunks for d in dones),
                     len(data) // 2, rate, first.ttfc_ms, round(compute / seconds, 5) if seconds else 0.0, workers)
    out.put_nowait(Completed(seg.job, data, rate, done, replayed))
