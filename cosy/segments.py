"""Long texts as sentence jobs, their audio merged back in order: plain code, no sockets, no event loop.

Two parts, driven by `cosy say` (a synchronous loop over :class:`cosy.client.Client`) and by the gateways
(an asyncio adapter, :mod:`cosy.gateways.segments`) alike:

:class:`SentenceSplitter` cuts text into sentences as it arrives (streamed input) or all at once
(:func:`split_text`). A sentence ends at ``. ! ? …`` (plus closing quotes or brackets) followed by
whitespace, at ``。！？``, or at a blank line. A piece shorter than ``min_chars`` that ends in a full stop
("Dr.", "e.g.", "No. 5.") joins the next one instead of becoming a job of its own ("Oh!" does not). A piece
longer than ``max_chars`` is cut at the last clause boundary (``, ; : –`` or ``，、；：``) in its first
``max_chars``, else at the last space; a run with no space at all may stay whole up to ``hard_chars`` (the
broker's per-job limit), longer than that is :class:`TextTooLong`. Nothing is dropped: the pieces hold every
non-space character of the text, in order.

:class:`OrderedMerge` runs the pieces as jobs and merges their audio in order. The driver submits what
:meth:`~OrderedMerge.submissions` names, feeds it the client's events (:meth:`~OrderedMerge.feed`), cancels
what :meth:`~OrderedMerge.expire` and :meth:`~OrderedMerge.abandon` name, and reads what comes out in order
(:meth:`~OrderedMerge.take`):

- :class:`PartAudio`: live audio, in order: the head part's chunks as they arrive, then the next part's
  (buffered while it was behind the head). ``restart`` marks a part whose audio starts over after some of it
  went out (a worker was lost mid-sentence, or the part is retried): a gateway cannot take that back.
- :class:`PartDone`: a part's complete audio (exactly its DONE), in order, once, right after its live audio.
  What goes to a file is these, so a file is exact even when playback heard a restart.
- :class:`Retrying`: a part failed or was turned away BUSY and is submitted again (for a message).
- :class:`MergeFailed`: a part failed for good (after ``retries``); nothing more comes. The driver cancels
  :meth:`~OrderedMerge.abandon`'s jobs and must not present what it has as complete.
- :class:`MergeDone`: every part is done (after :meth:`~OrderedMerge.close`): one DONE for the whole.

Memory is bounded by the window: at most ``window`` parts from the head on are submitted, and a part's audio
is held only until it has gone out in order. The first part goes alone; the others follow once it sounds, so
the first sentence does not share the machine with the second while it is being synthesized.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from cosy import protocol as P
from cosy.client import Audio, Completed, Failed, Rejected

# A sentence ends at . ! ? … (plus closing quotes or brackets) and whitespace; at 。！？ (no space needed);
# or at a blank line.
SENTENCE_END = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+"
                          r"|[\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]\u300d\u300f]*\s*"
                          r"|\n\s*\n")
# Where a long sentence may be cut: after , ; : ) ] and dashes followed by whitespace, a dash between spaces,
# or the CJK clause marks.
CLAUSE_END = re.compile(r"[,;:)\]\u2013\u2014][\"'\u201d\u2019]*\s+|\s[-\u2013\u2014]+\s+|[\uff0c\u3001\uff1b\uff1a]")
SPACE = re.compile(r"\s+")
CJK = re.compile(r"[\u2e80-\u9fff\uf900-\ufaff\uff00-\uffef]")  # Chinese, Japanese: no spaces
CLOSING = "\"')]\u201d\u2019"
MAX_SEGMENT_CHARS = 400
MIN_SENTENCE_CHARS = 16  # shorter pieces ending in "." ("Dr.", "e.g.", "No.") join the next one


class TextTooLong(ValueError):
    """A run of text longer than the per-job limit with no space or punctuation to cut it at."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"the text has a run of {length} characters with no space or punctuation to cut it at; "
                         f"one job takes at most {limit}")
        self.length = length
        self.limit = limit


def cut_long(text: str, max_chars: int = MAX_SEGMENT_CHARS, hard_chars: int = P.MAX_TEXT_CHARS,
             final: bool = True) -> tuple[list[str], str]:
    """Cut ``text`` (stripped) into pieces of at most ``max_chars``: at a clause boundary in the last two thirds
    of the window, else at the last whitespace, else (a run with no space) at the first whitespace after it if
    that is within ``hard_chars``. Returns (pieces, rest): with ``final`` the rest is empty and every piece is
    returned; without (more text may follow) the last piece, which may still grow, is the rest. Raises
    :class:`TextTooLong` for a run longer than ``hard_chars`` with no boundary (without ``final``: only once
    the run is known to be that long)."""
    out: list[str] = []
    text = text.strip()
    while len(text) > max_chars:
        at = _cut_at(text, max_chars)
        if at is None:  # no boundary in the window: the run ends at the next whitespace, if it fits a job
            space = SPACE.search(text, max_chars)
            if space is None:
                if len(text) > hard_chars:
                    raise TextTooLong(len(text), hard_chars)
                if not final:
                    return out, text  # the run may end with the next text
                break
            if space.start() > hard_chars:
                raise TextTooLong(space.start(), hard_chars)
            at = space.start()
        out.append(text[:at].rstrip())
        text = text[at:].lstrip()
    if final:
        if text:
            out.append(text)
        return out, ""
    return out, text


def _cut_at(text: str, max_chars: int) -> int | None:
    """Where to cut ``text`` so that the head (stripped) has at most ``max_chars``: a clause boundary, else a
    space; None when the first ``max_chars + 1`` characters have neither."""
    window = text[:max_chars + 1]
    best = None
    for m in CLAUSE_END.finditer(window, max_chars // 3):
        end = m.end()
        head = len(text[:end].rstrip())
        if 0 < head <= max_chars:
            best = end
    if best is not None:
        return best
    spaces = [m.start() for m in SPACE.finditer(window) if m.start() > 0]
    if spaces:
        return spaces[-1]
    # A piece with no space in the window (CJK without punctuation, a long URL): not here.
    return None


def _join(a: str, b: str) -> str:
    """Two pieces as one: with a space, but none after CJK (it has none between sentences)."""
    return f"{a}{b}" if CJK.match(a[-1]) else f"{a} {b}"


class SentenceSplitter:
    """Cuts streamed text into sentences as soon as each one is complete.

    ``add(text)`` returns the sentences the text completed; ``flush()`` (the input paused, or ended) returns
    what is left as sentences too. Short pieces wait for the next one; long ones are cut (see the module).
    """

    def __init__(self, max_chars: int = MAX_SEGMENT_CHARS, min_chars: int = MIN_SENTENCE_CHARS,
                 hard_chars: int = P.MAX_TEXT_CHARS) -> None:
        self.max_chars = max_chars
        self.min_chars = min_chars
        self.hard_chars = max(hard_chars, max_chars)
        self._buffer = ""
        self._carry = ""  # a short complete piece waiting for the next

    @property
    def pending(self) -> bool:
        """Whether text is held that ``flush()`` would return."""
        return bool(self._carry or self._buffer.strip())

    def add(self, text: str) -> list[str]:
        buf = self._buffer + text
        out: list[str] = []
        pos = 0
        while True:
            match = SENTENCE_END.search(buf, pos)
            if match is None or (match.end() == len(buf) and not buf[-1].isspace()):
                break  # (a CJK mark at the very end may go on with a closing quote)
            out += self._complete(buf[pos:match.end()])
            pos = match.end()
        rest = buf[pos:]
        if len(self._carry) + len(rest) > self.max_chars:  # no sentence end in sight: cut what can be cut
            pieces, rest = cut_long(self._join(rest), self.max_chars, self.hard_chars, final=False)
            self._carry = ""
            out += pieces
        self._buffer = rest
        return out

    def flush(self) -> list[str]:
        """Everything held, as sentences (the input paused or ended)."""
        rest, self._buffer = self._buffer, ""
        text, self._carry = self._join(rest), ""
        return cut_long(text, self.max_chars, self.hard_chars)[0] if text else []

    finish = flush

    def _join(self, text: str) -> str:
        text = text.strip()
        if self._carry:
            return _join(self._carry, text) if text else self._carry
        return text

    def _complete(self, piece: str) -> list[str]:
        piece = self._join(piece)
        self._carry = ""
        if not piece:
            return []
        if len(piece) < self.min_chars and piece.rstrip(CLOSING).endswith("."):
            self._carry = piece  # "Dr.", "No. 5.": most likely not a sentence's end; "Oh!" is one
            return []
        return cut_long(piece, self.max_chars, self.hard_chars)[0]


def split_sentences(text: str, max_chars: int = MAX_SEGMENT_CHARS, min_chars: int = MIN_SENTENCE_CHARS,
                    hard_chars: int = P.MAX_TEXT_CHARS) -> list[str]:
    """A whole text as sentences (each at most ``max_chars`` where it can be cut); a short last piece joins the
    one before it when they fit together."""
    splitter = SentenceSplitter(max_chars, min_chars, hard_chars)
    sentences = [*splitter.add(text), *splitter.flush()]
    if len(sentences) > 1 and len(sentences[-1]) < min_chars and \
            len(sentences[-2]) + 1 + len(sentences[-1]) <= max_chars:
        last = sentences.pop()
        sentences[-1] = _join(sentences[-1], last)
    return sentences


def split_text(text: str, max_chars: int = MAX_SEGMENT_CHARS) -> list[str]:
    """Segments for the gateways: the first sentence alone (it starts the response), the rest grouped up to
    ``max_chars``. Nothing is dropped: joining the segments with single spaces gives the text with its runs of
    whitespace between sentences collapsed. A text of one sentence is one segment, as it is."""
    sentences = split_sentences(text, max_chars)
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


# --- the ordered merge ------------------------------------------------------------------------------------

RETRYABLE = {P.WORKER_LOST, "INCOMPLETE_AUDIO", P.CLIENT_GONE, P.ENGINE_ERROR, "TIMEOUT"}


@dataclass(frozen=True)
class Submission:
    """Submit ``text`` as job ``job`` (part ``index``, 0-based)."""

    index: int
    job: str
    text: str


@dataclass(frozen=True)
class PartAudio:
    index: int
    data: bytes  # s16le
    sample_rate: int
    restart: bool  # this part's audio starts over after some of it went out
    attempt: int = 1  # the broker's attempt of the part's job (1 unless a worker was lost)


@dataclass(frozen=True)
class PartDone:
    index: int
    text: str
    data: bytes  # the part's complete audio, exactly its DONE's samples
    sample_rate: int
    done: P.JobDone
    replayed: int

    @property
    def samples(self) -> int:
        return len(self.data) // 2


@dataclass(frozen=True)
class Retrying:
    index: int
    text: str
    code: str
    message: str
    busy: bool  # turned away BUSY (not counted as a try)
    tries: int


@dataclass(frozen=True)
class MergeFailed:
    index: int
    text: str
    code: str
    message: str  # the broker's (or the merge's) reason
    where: str  # the sentence's position: "sentence 3 of 9" (or "sentence 3" while input may still come)
    rejected: bool = False  # the broker refused it (a Rejected, e.g. UNKNOWN_VOICE), not a failed synthesis
    voices: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MergeDone:
    done: P.JobDone  # for the whole text: samples, chunks, workers ("a,b"), rtf over all parts
    replayed: int
    parts: int


Output = PartAudio | PartDone | Retrying | MergeFailed | MergeDone


@dataclass
class _Part:
    index: int
    text: str
    tries: int = 0  # submissions that the broker took (BUSY ones do not count)
    busy: int = 0  # BUSY rejections in a row
    busy_since: float | None = None  # first submitted (since its last real try)
    job: str = ""
    running: bool = False
    not_before: float = 0.0
    deadline: float = 0.0
    run: str = ""  # the run whose chunks are held or went out
    live: list[bytes] = field(default_factory=list)  # chunks held while the part is behind the head
    sent: int = 0  # samples of this part that went out as PartAudio
    restart: bool = False  # its complete audio is of another run than what went out
    result: Completed | None = None


class OrderedMerge:
    """Parts (sentences) as jobs, their audio out in order. See the module docstring for the protocol.

    ``job`` names the whole (the parts are ``JOB-INDEX``, retries ``JOB-INDEX.TRY``); ``window`` bounds the
    parts submitted from the head on; ``retries`` how often a failed part is submitted again (0: none);
    ``busy_backoff``: a BUSY rejection is retried after a pause (up to ``busy_timeout_s``), otherwise it fails
    the merge; ``timeout_s``: an attempt that has not completed after that long is cancelled (see
    :meth:`expire`) and counts as a failed try.
    """

    def __init__(self, job: str, *, window: int = 2, retries: int = 0, busy_backoff: bool = False,
                 busy_timeout_s: float = 60.0, timeout_s: float | None = None) -> None:
        self.job = job
        self.window = max(1, window)
        self.retries = retries
        self.busy_backoff = busy_backoff
        self.busy_timeout_s = busy_timeout_s
        self.timeout_s = timeout_s
        self.closed = False
        self.failed: MergeFailed | None = None
        self.complete = False
        self.sample_rate = 0
        self._count = 0  # parts added
        self._head = 0  # the first part not yet out
        self._parts: dict[int, _Part] = {}  # from the head on
        self._jobs: dict[str, _Part] = {}  # the running attempts
        self._out: deque[Output] = deque()
        self._sounded = False
        # totals for MergeDone
        self._samples = 0
        self._chunks = 0
        self._compute_s = 0.0
        self._attempt = 1
        self._workers: dict[str, None] = {}
        self._first_done: P.JobDone | None = None
        self._replayed = 0

    # --- input -----------------------------------------------------------------------------------------

    def add(self, text: str) -> int:
        """Append a part; returns its index."""
        assert not self.closed, "add() after close()"
        index = self._count
        self._parts[index] = _Part(index, text)
        self._count += 1
        return index

    def close(self) -> None:
        """No more parts."""
        self.closed = True
        self._check_complete()

    @property
    def parts(self) -> int:
        return self._count

    @property
    def finished(self) -> bool:
        return self.complete or self.failed is not None

    def backlog(self) -> int:
        """Parts added but not yet submitted (how much more input is worth reading now)."""
        return sum(1 for p in self._parts.values() if not p.running and p.result is None)

    # --- what the driver does ----------------------------------------------------------------------------

    def submissions(self, now: float) -> list[Submission]:
        """The parts to submit now (mark them running)."""
        if self.finished:
            return []
        limit = self._head + (self.window if self._sounded else 1)
        out = []
        for index in range(self._head, min(limit, self._count)):
            part = self._parts[index]
            if part.running or part.result is not None or part.not_before > now:
                continue
            attempt = part.tries + part.busy + 1
            part.job = f"{self.job}-{index}" if attempt == 1 else f"{self.job}-{index}.{attempt}"
            part.running = True
            part.deadline = now + self.timeout_s if self.timeout_s else 0.0
            if part.busy_since is None:
                part.busy_since = now
            self._jobs[part.job] = part
            out.append(Submission(index, part.job, part.text))
        return out

    def next_due(self) -> float | None:
        """The earliest time a backed-off part may be submitted (None: nothing waits on the clock)."""
        times = [p.not_before for p in self._parts.values() if not p.running and p.result is None and p.not_before]
        times += [p.deadline for p in self._jobs.values() if p.deadline]
        return min(times) if times else None

    def expire(self, now: float) -> list[str]:
        """Attempts past their deadline: they count as failed (retried or not); the driver cancels them."""
        late = [p for p in self._jobs.values() if p.deadline and now >= p.deadline]
        for part in late:
            self._failed(part, "TIMEOUT", f"no complete audio after {self.timeout_s:g} s", now)
        return [p.job for p in late]

    def abandon(self) -> list[str]:
        """The jobs still running (to cancel after a failure, or when the driver stops)."""
        jobs = list(self._jobs)
        for part in self._jobs.values():
            part.running = False
        self._jobs.clear()
        return jobs

    def owns(self, job: str) -> bool:
        return job in self._jobs

    def feed(self, ev: object, now: float) -> bool:
        """A client event (Audio, Completed, Failed, Rejected; others are ignored). False: not one of ours."""
        part = self._jobs.get(getattr(ev, "job", ""))
        if part is None or self.failed is not None:
            return False
        if isinstance(ev, Audio):
            self._on_audio(part, ev)
        elif isinstance(ev, Completed):
            del self._jobs[part.job]
            part.running = False
            self._on_completed(part, ev)
        elif isinstance(ev, Rejected):
            del self._jobs[part.job]
            part.running = False
            if ev.code == P.BUSY and self.busy_backoff:
                self._busy(part, ev, now)
            else:
                self._fail(part, ev.code, ev.message, rejected=True, voices=ev.voices)
        elif isinstance(ev, Failed):
            self._failed(part, ev.code, ev.message, now)
        return True

    def take(self) -> list[Output]:
        """What came out since the last call, in order."""
        out = list(self._out)
        self._out.clear()
        return out

    # --- inside --------------------------------------------------------------------------------------------

    def _position(self, part: _Part) -> str:
        return f"sentence {part.index + 1} of {self._count}" if self.closed else f"sentence {part.index + 1}"

    def _on_audio(self, part: _Part, ev: Audio) -> None:
        if not ev.data:
            return
        if self.sample_rate and ev.sample_rate != self.sample_rate:
            self._fail(part, P.ENGINE_ERROR, f"came at {ev.sample_rate} Hz, the first sentence at "
                                             f"{self.sample_rate} Hz: serve this voice from one kind of worker")
            return
        self.sample_rate = ev.sample_rate
        if part.index == 0:
            self._sounded = True
        restart = False
        if ev.run != part.run:  # a new attempt: what was held of the old one goes
            part.live.clear()
            restart = part.sent > 0
            part.sent = 0
            part.run = ev.run
        if part.index == self._head:
            part.sent += len(ev.data) // 2
            self._out.append(PartAudio(part.index, ev.data, ev.sample_rate, restart, ev.attempt))
        else:
            part.live.append(ev.data)

    def _on_completed(self, part: _Part, ev: Completed) -> None:
        if self.sample_rate and ev.samples and ev.sample_rate != self.sample_rate:
            self._fail(part, P.ENGINE_ERROR, f"came at {ev.sample_rate} Hz, the first sentence at "
                                             f"{self.sample_rate} Hz: serve this voice from one kind of worker")
            return
        self.sample_rate = self.sample_rate or ev.sample_rate
        if part.index == 0:
            self._sounded = True
        if ev.done.run != part.run:  # the live chunks were of another run, or there were none
            restart = part.sent > 0
            part.live.clear()
            part.sent = 0
            part.run = ev.done.run
            part.restart = restart
        part.result = ev
        self._advance()

    def _advance(self) -> None:
        while self._head in self._parts:
            part = self._parts[self._head]
            if part.result is None:
                if part.live:  # the new head's held chunks go out now
                    data = b"".join(part.live)
                    part.live.clear()
                    part.sent += len(data) // 2
                    self._out.append(PartAudio(part.index, data, self.sample_rate, False))
                break
            ev = part.result
            restart = part.restart
            part.live.clear()  # held chunks are superseded by the complete audio
            if part.sent < ev.samples:  # what the live events did not carry (or all of it, for a part behind)
                self._out.append(PartAudio(part.index, ev.data[part.sent * 2:], ev.sample_rate, restart,
                                           ev.done.attempt))
                part.sent = ev.samples
            self._out.append(PartDone(part.index, part.text, ev.data, ev.sample_rate, ev.done, ev.replayed))
            self._account(ev)
            del self._parts[self._head]
            self._head += 1
        self._check_complete()

    def _account(self, ev: Completed) -> None:
        done = ev.done
        self._first_done = self._first_done or done
        self._samples += ev.samples
        self._chunks += done.chunks
        if done.sample_rate:
            self._compute_s += done.rtf * done.samples / done.sample_rate
        self._attempt = max(self._attempt, done.attempt)
        self._workers.setdefault(done.worker, None)
        self._replayed += ev.replayed

    def _check_complete(self) -> None:
        if self.closed and not self.finished and self._head == self._count:
            first = self._first_done
            rate = self.sample_rate or (first.sample_rate if first else 0)
            seconds = self._samples / rate if rate else 0.0
            done = P.JobDone(self.job, first.run if first else "", self._attempt, self._chunks, self._samples, rate,
                             first.ttfc_ms if first else 0.0, round(self._compute_s / seconds, 5) if seconds else 0.0,
                             ",".join(self._workers))
            self.complete = True
            self._out.append(MergeDone(done, self._replayed, self._count))

    def _busy(self, part: _Part, ev: Rejected, now: float) -> None:
        if part.busy_since is not None and now - part.busy_since > self.busy_timeout_s:
            self._fail(part, P.BUSY, f"the broker stayed busy for {self.busy_timeout_s:g} s ({ev.message})")
            return
        part.busy += 1
        part.not_before = now + min(5.0, 0.2 * 2 ** part.busy)
        self._out.append(Retrying(part.index, part.text, ev.code, ev.message, True, part.tries))

    def _failed(self, part: _Part, code: str, message: str, now: float) -> None:
        self._jobs.pop(part.job, None)
        part.running = False
        part.tries += 1
        if code in RETRYABLE and part.tries <= self.retries:
            part.not_before = now + 0.5 * part.tries
            part.busy_since = None
            self._out.append(Retrying(part.index, part.text, code, message, False, part.tries))
            return
        self._fail(part, code, message)

    def _fail(self, part: _Part, code: str, message: str, rejected: bool = False,
              voices: list[str] | None = None) -> None:
        self.failed = MergeFailed(part.index, part.text, code, message, self._position(part), rejected,
                                  list(voices or []))
        self._out.append(self.failed)
