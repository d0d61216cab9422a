"""`cosy say`: a text of any length, played as it is synthesized and/or saved.

- The text (an argument, a file, or standard input as it arrives) is cut into sentences by
  :class:`cosy.segments.SentenceSplitter`; each sentence is a job, and :class:`cosy.segments.OrderedMerge`
  (the same merge the gateways use for long inputs) runs them across the workers, a window of them from
  the first unfinished one on, and gives their audio back strictly in order. The first sentence goes
  alone, so first audio comes after the first sentence whatever the length.
- A file or a pipe is read by a thread. From a pipe or a terminal (``-``, ``--file /dev/stdin``) a
  sentence is submitted as soon as it is complete: a sentence end followed by more text, a blank line,
  the end of the input, or ``--flush-after`` seconds without new input.
- The audio plays through one :class:`~cosy.cli.playback.LivePlayer` fed in order, and/or goes to
  ``--out`` sentence by sentence as each completes (:class:`cosy.audio.AudioFileWriter`: a temporary file
  renamed at the end), so memory stays bounded: a book of any size to ``--out book.flac`` works. While
  playing, no more sentences are submitted once ``PLAY_AHEAD_S`` of audio wait to be heard.
- ``--captions FILE.srt|FILE.vtt``: one cue per sentence, timed from the samples it produced.
- A sentence that fails is submitted again (``RETRIES`` times, as a `cosy batch` line is); if it still
  fails the command exits 1 naming the sentence and its position, and writes no file (the temporary
  one is removed). BUSY: back off and resubmit, for up to ``--timeout`` per sentence.
"""

from __future__ import annotations

import codecs
import errno
import os
import queue
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cosy import protocol as P
from cosy.cli import exits
from cosy.endpoints import Endpoints

RETRIES = 2  # resubmissions of a failed sentence (cosy batch's --retries default)
FLUSH_AFTER_S = 1.5
READ_CHUNK = 1 << 16
FIRST_READ = 1 << 12
READ_AHEAD_CHUNKS = 16  # what the reader thread may hold before the loop takes it (~1 MB)
BACKLOG = 16  # sentences split ahead of submission
MAX_WINDOW = 32
PLAY_AHEAD_S = 30.0
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class InputError(Exception):
    """The input cannot be read or decoded: a one-line reason."""


class TextInput:
    """The text as it arrives: a string all at once, or a file descriptor read by a thread.

    ``live``: a pipe or a terminal, whose text may pause (``--flush-after`` applies); a regular file is read as
    fast as the loop wants it. ``read()`` returns what arrived since the last call ("" when nothing did) and
    sets ``ended`` at the end of the input.
    """

    def __init__(self, text: str | None = None, fd: int | None = None, live: bool = False) -> None:
        self.live = live
        self.ended = False
        self.last_at = time.monotonic()  # when text last arrived
        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._offset = 0  # bytes decoded so far
        self._chunks: queue.Queue[bytes | OSError] = queue.Queue(READ_AHEAD_CHUNKS)
        if fd is not None:
            threading.Thread(target=self._read, args=(fd,), name="cosy-say-input", daemon=True).start()

    def _read(self, fd: int) -> None:
        size = FIRST_READ  # small first: the first sentence is submitted before the rest is split
        try:
            while True:
                data = os.read(fd, size)
                size = READ_CHUNK
                self._chunks.put(data)
                if not data:
                    return
        except OSError as exc:
            self._chunks.put(exc)

    def read(self, timeout_s: float = 0.0) -> str:
        if self._text is not None:
            text, self._text = self._text, None
            self.ended = True
            return text
        out: list[str] = []
        while not self.ended and len(out) < 4:
            try:
                item = self._chunks.get(timeout=timeout_s) if timeout_s > 0 and not out else self._chunks.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, OSError):
                raise InputError(f"cannot read the input: {item.strerror or item}")
            out.append(self._decode(item))
            self.ended = not item
        if out:
            self.last_at = time.monotonic()
        return "".join(out)

    def _decode(self, data: bytes) -> str:
        held = len(self._decoder.getstate()[0])
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise InputError(f"the input is not valid UTF-8 (byte {self._offset - held + exc.start})") from None
        self._offset += len(data)
        return text


def _open_input(text: str | None, file: Path | None) -> TextInput:
    if file is not None:
        if text is not None:
            exits.fail("give the text as an argument or with --file, not both", exits.USAGE)
        try:
            fd = os.open(file, os.O_RDONLY)
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            exits.fail(f"cannot read {file}: {exc.strerror}", exits.USAGE)
        if stat.S_ISDIR(mode):
            exits.fail(f"cannot read {file}: it is a folder", exits.USAGE)
        return TextInput(fd=fd, live=not stat.S_ISREG(mode))
    if text is None or text == "-":
        if text is None and sys.stdin.isatty():
            exits.fail("no text: give it as an argument, with --file, or on standard input with '-'", exits.USAGE)
        fd = sys.stdin.fileno()
        return TextInput(fd=fd, live=not stat.S_ISREG(os.fstat(fd).st_mode))
    if not text.strip():
        exits.fail("the text is empty", exits.USAGE)
    return TextInput(text=text)


def _print_voices(eps: Endpoints) -> int:
    from cosy.cli.status import fetch_status

    st = fetch_status(eps)
    by_voice: dict[str, list[str]] = {}
    for w in st["workers"]:
        for v in w["voices"]:
            by_voice.setdefault(v, []).append(w["name"])
    if not by_voice:
        print("no workers are connected, so no voices are served", file=sys.stderr)
        return exits.OK
    for v in sorted(by_voice):
        print(f"{v}\t{', '.join(by_voice[v])}")
    return exits.OK


def _check_output(path: Path, format_of: Callable[[Path], str], what: str) -> None:
    """Exit 2 before any work when ``path``'s extension names no format we write, or it cannot be written."""
    try:
        format_of(path)
    except ValueError as exc:
        exits.fail(str(exc), exits.USAGE)
    _check_writable(path, what)


def _check_writable(path: Path, what: str) -> None:
    if not path.parent.is_dir():
        exits.fail(f"cannot write {path}: folder {path.parent} does not exist", exits.USAGE)
    if path.is_dir():
        exits.fail(f"cannot write {what} to {path}: it is a folder", exits.USAGE)


def run_say(eps: Endpoints, *, text: str | None, file: Path | None, voice: str | None, out: str | None,
            raw: bool, play: bool, speed: float, priority: str, timeout: float, list_voices: bool,
            verbose: bool, instruct: str = "", captions: Path | None = None,
            flush_after: float = FLUSH_AFTER_S) -> int:
    t_start = time.perf_counter()
    if list_voices:
        return _print_voices(eps)
    if not 0.25 <= speed <= 4.0:
        exits.fail(f"--speed {speed} is outside 0.25-4.0", exits.USAGE)
    if priority not in P.PRIORITIES:
        exits.fail(f"--priority must be one of {', '.join(P.PRIORITIES)}", exits.USAGE)
    if not flush_after > 0:
        exits.fail(f"--flush-after must be more than 0 seconds, not {flush_after:g}", exits.USAGE)
    to_stdout = out == "-"
    out_path = None if out is None or to_stdout else Path(out)
    if out_path is not None:
        from cosy.audio import format_for

        _check_output(out_path, format_for, "the audio")
    if captions is not None:
        from cosy.captions import caption_format_for

        _check_output(captions, caption_format_for, "captions")
    if raw and not to_stdout:
        exits.fail("--raw applies to -o - (audio on standard output)", exits.USAGE)
    if to_stdout and sys.stdout.isatty():
        exits.fail("refusing to write audio to a terminal: pipe it (cosy say ... -o - | aplay)", exits.USAGE)
    source = _open_input(text, file)
    say = Say(eps, source, voice=voice, speed=speed, priority=priority, instruct=instruct, timeout=timeout,
              out_path=out_path, to_stdout=to_stdout, raw=raw, play=play and not to_stdout, captions=captions,
              flush_after=flush_after, verbose=verbose, t_start=t_start)
    return say.run()


class Say:
    """One `cosy say` run: the input, the merge over the client, and where the audio goes."""

    def __init__(self, eps: Endpoints, source: TextInput, *, voice: str | None, speed: float, priority: str,
                 instruct: str, timeout: float, out_path: Path | None, to_stdout: bool, raw: bool, play: bool,
                 captions: Path | None, flush_after: float, verbose: bool, t_start: float) -> None:
        from cosy.client import Client
        from cosy.segments import OrderedMerge, SentenceSplitter

        self.eps = eps
        self.source = source
        self.voice, self.speed, self.priority, self.instruct = voice, speed, priority, instruct
        self.timeout = timeout
        self.out_path = out_path
        self.play = play
        self.captions = captions
        self.flush_after = flush_after
        self.verbose = verbose
        self.t_start = t_start
        self.t_first: float | None = None
        self.client = Client(eps)
        self.splitter = SentenceSplitter()
        self.merge = OrderedMerge(uuid.uuid4().hex[:24], window=2, retries=RETRIES, busy_backoff=True,
                                  busy_timeout_s=timeout, timeout_s=timeout)
        self.sink: Any = None
        if to_stdout:
            from cosy.audio import PcmSink

            self.sink = PcmSink(sys.stdout.buffer, raw=raw)
        self.player: Any = None
        self.player_error: str | None = None
        self.writer: Any = None
        self.cues: Any = None
        self.samples = 0
        self.sample_rate = 0
        self.submitted = 0
        self.busy_said = False
        self.probe: WorkerProbe | None = None

    # --- the loop ---------------------------------------------------------------------------------------

    def run(self) -> int:
        from cosy.client import BrokerRestarted, BrokerUnreachable, Started

        try:
            try:
                self.client.connect(timeout_s=min(self.timeout, 5.0))
            except BrokerUnreachable as exc:
                exits.fail(str(exc), exits.UNREACHABLE)
            while True:
                now = time.monotonic()
                self._take_input(0.0)
                if self._may_submit():
                    for sub in self.merge.submissions(now):
                        self._submit(sub)
                for job in self.merge.expire(now):
                    self.client.cancel(job)
                    self.client.forget(job)
                code = self._outputs()
                if code is not None:
                    return code
                if self.probe is not None:
                    capacity = self.probe.capacity()
                    if capacity is not None:
                        self.merge.window = min(MAX_WINDOW, max(2, 2 * capacity))
                        self.probe = None
                if self.client.pending():
                    events = self.client.poll(0.02 if self._wants_input() else 0.05)
                else:  # nothing in flight: wait on the input instead (the broker is pinged every loop)
                    self._take_input(0.05 if self._wants_input() else 0.0)
                    events = self.client.poll(0 if self._wants_input() else 0.05)
                for ev in events:
                    if isinstance(ev, BrokerRestarted):
                        print(f"cosy: the broker restarted; {ev.resubmitted} sentence jobs resubmitted",
                              file=sys.stderr)
                    elif isinstance(ev, Started) and ev.attempt > 1:
                        print(f"cosy: worker lost; attempt {ev.attempt} on {ev.worker}", file=sys.stderr)
                    else:
                        self.merge.feed(ev, time.monotonic())
        except InputError as exc:
            self._stop(str(exc), exits.USAGE)
        except KeyboardInterrupt:
            self._cancel_all()
            if self.player is not None:
                self.player.close()
                self.player = None
            return exits.INTERRUPTED
        finally:
            if self.writer is not None:
                self.writer.abort()  # nothing after a commit; the temporary file otherwise
            if self.player is not None:
                self.player.close()
            if self.probe is not None:
                self.probe.close()
            self.client.close()

    def _wants_input(self) -> bool:
        return not self.merge.closed and self.merge.backlog() < BACKLOG

    def _take_input(self, timeout_s: float) -> None:
        """Read what arrived and add the sentences it completed."""
        if not self._wants_input():
            return
        from cosy.segments import TextTooLong

        text = self.source.read(timeout_s)
        try:
            sentences = self.splitter.add(text) if text else []
            if self.source.ended or (self.source.live and self.splitter.pending
                                     and time.monotonic() - self.source.last_at >= self.flush_after):
                sentences += self.splitter.flush()
        except TextTooLong as exc:
            self._stop(str(exc), exits.USAGE)
        for sentence in sentences:
            self.merge.add(sentence)
        if self.source.ended:
            if not self.merge.parts:
                self._stop("the text is empty", exits.USAGE)
            self.merge.close()

    def _may_submit(self) -> bool:
        """While playing, no more sentences once enough audio waits to be heard (memory stays bounded)."""
        return self.player is None or self.player.buffered_s < PLAY_AHEAD_S

    def _submit(self, sub: Any) -> None:
        from cosy.client import JobSpec

        self.client.submit(JobSpec(text=sub.text, voice=self.voice, speed=self.speed, priority=self.priority,
                                   job=sub.job, instruct=self.instruct))
        self.submitted += 1
        if self.submitted == 1:
            self._after_first_submit()

    def _after_first_submit(self) -> None:
        # What does not need the broker happens while the worker synthesizes: initialising PortAudio (~60 ms)
        # to play, importing numpy (~90 ms) to save a file, asking how many workers there are. Nothing else: on
        # a small machine a CPU engine needs the cores (Piper's first sentence took ~100 ms longer on 2 cores
        # while `cosy say` imported numpy). Playing and piping work on the chunks' bytes, without numpy.
        if self.play:
            from cosy.cli.playback import NoAudioDevice, check_output_device

            try:
                check_output_device()
            except NoAudioDevice as exc:
                self.player_error = str(exc)
                self.play = False
                if self.out_path is None:
                    self._cancel_all()
                    exits.fail(f"{exc}; use --out FILE to save the audio instead", exits.JOB_FAILED)
                print(f"cosy: {exc}; saving to {self.out_path} only", file=sys.stderr)
        if self.out_path is not None:
            import numpy  # noqa: F401
        if not self.merge.closed or self.merge.parts > 1:
            self.probe = WorkerProbe(self.eps)

    # --- what the merge gives -------------------------------------------------------------------------------

    def _outputs(self) -> int | None:
        from cosy.segments import MergeDone, MergeFailed, PartAudio, PartDone, Retrying

        for item in self.merge.take():
            if isinstance(item, PartAudio):
                self._audio(item)
            elif isinstance(item, PartDone):
                self._save(item)
            elif isinstance(item, Retrying):
                self._retrying(item)
            elif isinstance(item, MergeFailed):
                self._failed(item)
            elif isinstance(item, MergeDone):
                return self._finish(item)
        return None

    def _audio(self, item: Any) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.play:
            if self.player is None:
                from cosy.cli.playback import LivePlayer, NoAudioDevice

                try:
                    self.player = LivePlayer(item.sample_rate)
                except NoAudioDevice as exc:
                    self.play = False
                    print(f"cosy: {exc}", file=sys.stderr)
            if self.player is not None:
                self.player.feed(item.data)  # a restarted sentence plays again from its start
        if self.sink is not None:
            if item.restart and self.sink.started:
                self._stop(f"sentence {item.index + 1}: the worker was lost mid-stream and the audio already piped "
                           "cannot be taken back; use --out FILE for a file that is always complete",
                           exits.JOB_FAILED)
            self.sink.write(item.data, item.sample_rate)

    def _save(self, item: Any) -> None:
        self.samples += item.samples
        self.sample_rate = item.sample_rate
        if self.captions is not None:
            if self.cues is None:
                from cosy.captions import CueTimer

                self.cues = CueTimer(item.sample_rate)
            self.cues.add(item.text, item.samples)
        if self.out_path is None:
            return
        try:
            if self.writer is None:
                from cosy.audio import AudioFileWriter

                self.writer = AudioFileWriter(self.out_path, item.sample_rate)
            self.writer.write(item.data)
        except OSError as exc:
            self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        code = exits.NO_SPACE if exc.errno in NO_SPACE else exits.JOB_FAILED
        self._stop(f"cannot write {self.out_path}: {exc.strerror or exc}", code)

    def _retrying(self, item: Any) -> None:
        if item.busy:
            if not self.busy_said:
                self.busy_said = True
                print(f"cosy: {item.message}; retrying", file=sys.stderr)
            return
        print(f"cosy: sentence {item.index + 1} failed ({item.code}: {item.message}); "
              f"retrying ({item.tries} of {RETRIES})", file=sys.stderr)

    def _failed(self, item: Any) -> None:
        if item.rejected and item.code != P.BUSY:  # the request itself (e.g. UNKNOWN_VOICE), not this sentence
            self._stop(item.message if item.index == 0 else f"{item.where}: {item.message}", exits.USAGE)
        quoted = " ".join(item.text.split())
        quoted = quoted if len(quoted) <= 60 else quoted[:59] + "\u2026"
        code = exits.BUSY if item.code in (P.BUSY, "TIMEOUT") else exits.JOB_FAILED
        unsaved = "; nothing was saved" if self.out_path is not None else ""
        self._stop(f"{item.where} (\u201c{quoted}\u201d) failed ({item.code}): {item.message}{unsaved}", code)

    def _stop(self, message: str, code: int) -> None:
        """Cancel what runs, drop the unfinished file, exit with one line."""
        self._cancel_all()
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        exits.fail(message, code)

    def _cancel_all(self) -> None:
        jobs = self.merge.abandon()
        for job in jobs:
            self.client.cancel(job)
        if jobs:
            self.client.poll(0.05)

    def _finish(self, item: Any) -> int:
        done = item.done
        rate = self.sample_rate or done.sample_rate
        if self.out_path is not None:
            try:
                if self.writer is None:  # no sentence gave any sample
                    from cosy.audio import AudioFileWriter

                    self.writer = AudioFileWriter(self.out_path, rate)
                self.writer.commit()
                self.writer = None
            except OSError as exc:
                self.writer = None  # commit() removed the temporary file
                self._write_failed(exc)
        if self.captions is not None:
            from cosy.captions import write_captions

            try:
                write_captions(self.captions, self.cues.cues if self.cues is not None else [])
            except OSError as exc:
                code = exits.NO_SPACE if exc.errno in NO_SPACE else exits.JOB_FAILED
                exits.fail(f"cannot write {self.captions}: {exc.strerror or exc}", code)
        if self.player is not None:
            self.player.finish()
            self.player.wait(timeout=self.player.buffered_s + 5)
            self.player.close()
        if self.verbose:
            seconds = self.samples / rate if rate else 0.0
            ttfa = (self.t_first - self.t_start) * 1000 if self.t_first else float("nan")
            total = time.perf_counter() - self.t_start
            extra = f", {self.player.underruns} underruns" if self.player is not None else ""
            sentences = f" in {item.parts} sentences" if item.parts > 1 else ""
            print(f"cosy: first audio {ttfa:.0f} ms after start, {seconds:.2f} s of audio at {rate} Hz{sentences}, "
                  f"worker {done.worker} (attempt {done.attempt}, ttfc {done.ttfc_ms:.0f} ms, rtf {done.rtf:.3f}), "
                  f"total {total:.2f} s{extra}", file=sys.stderr)
        self.player = None
        return exits.OK


class WorkerProbe:
    """One STATUS request beside the job sockets, read when it comes (never waited for): how many jobs the
    workers take at once, which sizes the window of sentences in flight."""

    def __init__(self, eps: Endpoints) -> None:
        import zmq

        from cosy.security import prepare_client

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        prepare_client(self.sock, eps.curve_dir if eps.secure else None)
        self.sock.connect(eps.front)
        self.sock.send_multipart(P.StatusRequest().to_frames())

    def capacity(self) -> int | None:
        """The workers' total capacity once the reply came (then the socket is closed), else None."""
        import zmq

        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.close()
        try:
            msg = P.decode(frames, P.BROKER_TO_CLIENT)
        except P.ProtocolError:
            return 1
        status = getattr(msg, "status", None) or {}
        return sum(int(w.get("capacity", 1)) for w in status.get("workers", [])) or 1

    def close(self) -> None:
        self.sock.close(linger=0)
