"""`cosy batch`: render many lines across all workers; every line ends as one complete file or a reported failure.

- Input: one job per non-empty line; ``name<TAB>text`` lines; or JSONL lines with ``text``
  (and optionally ``name``, ``voice``, ``speed``), in the spirit of piper's --json-input.
- A bounded in-flight window (twice the workers' total capacity by default) keeps every
  worker busy without flooding the broker; BUSY rejections back off (0.2 s, doubling, at most
  5 s: :func:`busy_delay`) and retry.
- Files (any of :data:`cosy.encode.FILE_FORMATS`, through the gateways' encoders) are written
  atomically (temporary file, then rename) under names that cannot escape --outdir; a JSONL
  manifest records each line's outcome as it happens, with its captions (one cue per line, timed
  from the samples); ``--captions srt|vtt`` also writes NAME.srt or NAME.vtt beside each file.
- --resume skips lines whose file is complete and whose text is unchanged.
- Failed lines are retried (new job id), then listed at the end with a non-zero exit.
- A broker restart is survived: the client resubmits what was unfinished.
- A full disk (ENOSPC; or a quota, a read-only filesystem: :func:`cosy.diskspace.is_no_space`) stops
  the submitting; what is in flight is still written where it fits, a line that does not fit leaves
  nothing behind and no manifest record, and the command exits with ``exits.NO_SPACE`` saying how
  far it got: ``--resume`` does the rest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from cosy import protocol as P
from cosy.cli import exits
from cosy.diskspace import describe, is_no_space
from cosy.endpoints import Endpoints

if TYPE_CHECKING:
    from cosy.captions import Cue
    from cosy.client import Client, Completed, Event

NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
RETRYABLE = {P.WORKER_LOST, "INCOMPLETE_AUDIO", P.CLIENT_GONE, P.ENGINE_ERROR, P.BUSY}
FINAL = {P.BAD_REQUEST, P.TEXT_TOO_LONG, P.UNKNOWN_VOICE, P.DUPLICATE_JOB}
CAPTION_FORMATS = ("srt", "vtt")
BUSY_FIRST_S = 0.2
BUSY_MAX_S = 5.0


def busy_delay(rejections: int) -> float:
    """Seconds to wait before resubmitting a line the broker refused as BUSY ``rejections`` times in a row
    (1 = the first refusal): 0.2 s, doubling with each refusal, at most 5 s."""
    return min(BUSY_MAX_S, BUSY_FIRST_S * 2 ** min(max(rejections, 1) - 1, 10))


@dataclass
class Line:
    number: int  # 1-based line number in the input
    name: str
    text: str
    voice: str | None = None
    speed: float | None = None
    tries: int = 0  # attempts the broker took (a BUSY refusal is not one)
    busy: int = 0  # BUSY refusals in a row
    not_before: float = 0.0
    job: str = ""
    error: str = ""

    @property
    def digest(self) -> str:
        key = f"{self.text}\x00{self.voice}\x00{self.speed}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    invalid: list[Line] = field(default_factory=list)


def safe_name(raw: str, number: int) -> str:
    """A file stem that cannot leave the output folder: no separators, no dot-files, bounded."""
    name = NAME_RE.sub("_", raw.strip()).strip("._")[:100]
    return name or f"{number:06d}"


def parse_input(stream: BinaryIO) -> Parsed:
    out = Parsed()
    seen: set[str] = set()
    for number, raw in enumerate(stream, start=1):
        raw = raw.rstrip(b"\r\n")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.invalid.append(Line(number, f"{number:06d}", "", error=f"invalid UTF-8 at byte {exc.start}"))
            continue
        if not text.strip():
            continue
        name, voice, speed = f"{number:06d}", None, None
        stripped = text.strip()
        if stripped.startswith("{"):
            try:
                obj = json.loads(stripped)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError("a JSON line needs a \"text\" string")
                text = obj["text"]
                if obj.get("name") is not None:
                    name = safe_name(str(obj["name"]), number)
                voice = obj.get("voice") if isinstance(obj.get("voice"), str) else None
                if obj.get("speed") is not None:
                    speed = float(obj["speed"])
            except (ValueError, TypeError) as exc:
                out.invalid.append(Line(number, name, stripped, error=f"invalid JSON line: {exc}"))
                continue
        elif "\t" in text:
            raw_name, _, text = text.partition("\t")
            name = safe_name(raw_name, number)
        if not text.strip():
            out.invalid.append(Line(number, name, text, error="empty text"))
            continue
        if name in seen:
            name = f"{name}-line{number}"
        seen.add(name)
        out.lines.append(Line(number, name, text, voice, speed))
    return out


class Manifest:
    """Append-only JSONL: one record per outcome; the last record of a line wins.

    A record is appended whole or not at all: a write that fails (a full disk) is cut off again, so the file
    never holds half a line and the next run's --resume reads every record the file has.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous: dict[int, dict[str, Any]] = {}
        raw = path.read_bytes() if path.exists() else b""
        for text in raw.decode("utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(text)
                self.previous[int(rec["line"])] = rec
            except (ValueError, KeyError, TypeError):
                continue
        self._newline = bool(raw) and not raw.endswith(b"\n")  # a line cut short by a crash stays its own line
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record``; an OSError (ENOSPC...) leaves the file as it was before the call."""
        data = ("\n" if self._newline else "") + json.dumps(record, ensure_ascii=False) + "\n"
        size = os.fstat(self._fd).st_size
        view = memoryview(data.encode("utf-8"))
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError:
            os.ftruncate(self._fd, size)
            raise
        self._newline = False

    def close(self) -> None:
        os.close(self._fd)


def is_complete(path: Path, record: dict[str, Any] | None, line: Line) -> bool:
    """Whether ``path`` is the whole file the manifest ``record`` describes, for this line's text."""
    if record is None or record.get("sha") != line.digest or record.get("file") != path.name:
        return False
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if "bytes" in record:  # every format: the size the file had when it was renamed into place
        return size > 0 and size == record["bytes"]
    # A manifest from before the size was recorded (wav, flac and ogg only): the length libsndfile reads.
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:
        return False
    return info.frames > 0 and abs(info.frames / info.samplerate - float(record.get("duration_s", -1))) < 0.01


def line_cues(text: str, samples: int, sample_rate: int) -> list[Cue]:
    """The captions of one line's audio: one cue from its first sample to its last. (Engines report no finer
    timings in the protocol; Piper's are sentence level at best.)"""
    from cosy.captions import CueTimer

    timer = CueTimer(sample_rate)
    timer.add(text, samples)
    return timer.cues


def cues_to_json(cues: list[Cue]) -> list[dict[str, Any]]:
    return [{"start": round(c.start_s, 3), "end": round(c.end_s, 3), "text": c.text} for c in cues]


def cues_from_record(record: dict[str, Any]) -> list[Cue]:
    """A manifest record's captions; for a record written before the column existed, one cue over its audio."""
    from cosy.captions import Cue

    stored = record.get("captions")
    if isinstance(stored, list) and stored:
        try:
            return [Cue(float(c["start"]), float(c["end"]), str(c["text"])) for c in stored]
        except (KeyError, TypeError, ValueError):
            pass
    return [Cue(0.0, float(record.get("duration_s", 0.0)), " ".join(str(record.get("text", "")).split()))]


class Progress:
    """A rich progress bar on a terminal; plain periodic lines otherwise (logs, CI)."""

    def __init__(self, total: int, skipped: int) -> None:
        self.total = total
        self.done = skipped
        self.failed = 0
        self.audio_s = 0.0
        self.t0 = time.monotonic()
        self.start_done = skipped
        self._next_plain = self.t0 + 5
        self._rich: Any = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._rich = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                  transient=False, refresh_per_second=4)
            self._task = self._rich.add_task("batch", total=total, completed=skipped, rate="")
            self._rich.start()

    def rates(self) -> tuple[float, float]:
        dt = max(time.monotonic() - self.t0, 1e-6)
        return (self.done - self.start_done) / dt, self.audio_s / dt

    def update(self, ok: bool, audio_s: float = 0.0) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self.audio_s += audio_s
        self.tick()

    def tick(self) -> None:
        lines_s, audio_s = self.rates()
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done,
                              rate=f"{lines_s:.1f} lines/s  {audio_s:.1f} audio s/s  {self.failed} failed")
        elif time.monotonic() >= self._next_plain:
            self._next_plain = time.monotonic() + 5
            left = self.total - self.done
            eta = f"{left / lines_s:.0f} s" if lines_s > 0 else "?"
            print(f"cosy batch: {self.done}/{self.total} lines, {lines_s:.1f} lines/s, {audio_s:.1f} audio s/s, "
                  f"{self.failed} failed, ETA {eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _window(eps: Endpoints, requested: int | None) -> int:
    if requested:
        return requested
    from cosy.cli.status import fetch_status

    capacity = sum(w["capacity"] for w in fetch_status(eps)["workers"])
    return max(4, min(256, 2 * capacity))


def check_format(fmt: str) -> str:
    """``fmt`` if this installation writes it, else a one-line usage error naming the choices."""
    from cosy.encode import FILE_FORMATS, available_formats, why_unavailable

    if fmt not in FILE_FORMATS:
        exits.fail(f"--format must be one of {', '.join(FILE_FORMATS)}, not {fmt!r}", exits.USAGE)
    if fmt not in available_formats():
        exits.fail(f"--format {fmt} {why_unavailable(fmt)}", exits.USAGE)
    return fmt


class DiskFull(Exception):
    """Raised out of the start of a run when even the manifest's first records do not fit."""


@dataclass(frozen=True)
class Layout:
    """Where a line's files go: NAME.FORMAT, and NAME.srt or NAME.vtt with --captions."""

    outdir: Path
    fmt: str
    captions: str | None = None

    def audio_path(self, line: Line) -> Path:
        return self.outdir / f"{line.name}.{self.fmt}"

    def caption_path(self, line: Line) -> Path | None:
        return self.outdir / f"{line.name}.{self.captions}" if self.captions else None


class Batch:
    """One run over the lines left to do: submits within the window, stores what completes, retries or
    reports what fails; stops submitting once the disk is full."""

    def __init__(self, client: Client, layout: Layout, manifest: Manifest, progress: Progress,
                 todo: deque[Line], failed: list[Line], *, voice: str | None, speed: float, retries: int,
                 timeout: float, window: int, run_id: str) -> None:
        self.client = client
        self.layout = layout
        self.outdir = layout.outdir
        self.manifest = manifest
        self.progress = progress
        self.voice = voice
        self.speed = speed
        self.retries = retries
        self.timeout = timeout
        self.window = window
        self.run_id = run_id
        self.failed = failed
        self.todo = todo
        self.inflight: dict[str, Line] = {}
        self.written = 0
        self.full: OSError | None = None  # the first "no space" error, once the disk is full
        self._busy_shown = 0.0

    # --- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        while (self.todo and self.full is None) or self.inflight:
            self.submit_ready(time.monotonic())
            for ev in self.client.poll(0.05):
                self.on_event(ev)
            self.check_deadlines(time.monotonic())
            self.progress.tick()

    def submit_ready(self, now: float) -> None:
        from cosy.client import JobSpec

        while (self.full is None and self.todo and len(self.inflight) < self.window
               and self.todo[0].not_before <= now):
            line = self.todo.popleft()
            line.tries += 1
            line.job = f"b{self.run_id}-{line.number}-{line.tries}"
            self.inflight[line.job] = line
            self.client.submit(JobSpec(line.text, line.voice or self.voice, line.speed or self.speed, P.BULK,
                                       line.job))
            line.not_before = now + self.timeout  # the deadline while in flight

    def on_event(self, ev: Event) -> None:
        from cosy.client import BrokerRestarted, Completed, Failed, Rejected

        if isinstance(ev, BrokerRestarted):
            print(f"cosy batch: the broker restarted; resubmitted {ev.resubmitted} jobs", file=sys.stderr)
            return
        line = self.inflight.get(getattr(ev, "job", ""))
        if line is None:
            return
        if isinstance(ev, Completed):
            del self.inflight[ev.job]
            line.busy = 0
            if self.store(line, ev):
                self.written += 1
                self.progress.update(True, ev.samples / ev.sample_rate)
        elif isinstance(ev, (Failed, Rejected)):
            del self.inflight[ev.job]
            self.retry_or_fail(line, ev.code, ev.message)

    def check_deadlines(self, now: float) -> None:
        for job, line in list(self.inflight.items()):
            if now > line.not_before:
                self.client.cancel(job)
                self.client.forget(job)
                del self.inflight[job]
                self.retry_or_fail(line, "TIMEOUT", f"no audio after {self.timeout:g} s")

    def retry_or_fail(self, line: Line, code: str, message: str) -> None:
        if code == P.BUSY:
            line.tries -= 1  # the broker never took it: not an attempt
            line.busy += 1
            delay = busy_delay(line.busy)
            if delay > self._busy_shown:  # a handful of lines a run: each time the back-off reaches a new high
                self._busy_shown = delay
                print(f"cosy batch: the broker is busy ({message}); waiting {delay:g} s before resubmitting",
                      file=sys.stderr, flush=True)
            line.not_before = time.monotonic() + delay
            self.todo.appendleft(line)
            return
        line.busy = 0
        if code not in FINAL and line.tries <= self.retries:
            line.not_before = time.monotonic() + 0.5 * line.tries
            self.todo.append(line)
            return
        self.fail(line, f"{code}: {message}")

    def fail(self, line: Line, error: str) -> None:
        line.error = error
        self.failed.append(line)
        self.progress.update(False)
        self.record({"line": line.number, "name": line.name, "text": line.text, "error": line.error,
                     "attempts": line.tries})

    # --- files ----------------------------------------------------------------------------

    def record(self, record: dict[str, Any]) -> bool:
        """Append a manifest record; False (and the disk marked full) where it does not fit."""
        try:
            self.manifest.write(record)
        except OSError as exc:
            if not is_no_space(exc):
                exits.fail(f"cannot write the manifest {self.manifest.path}: {exc.strerror or exc}",
                           exits.JOB_FAILED)
            self.disk_full(exc)
            return False
        return True

    def disk_full(self, exc: OSError) -> None:
        if self.full is None:
            self.full = exc
            print(f"cosy batch: {describe(exc, self.outdir)}; submitting nothing more, "
                  f"{len(self.inflight)} lines in flight", file=sys.stderr, flush=True)

    def store(self, line: Line, ev: Completed) -> bool:
        """Write the line's file (and captions), then its manifest record; all of it or none of it."""
        from cosy.audio import AudioFileWriter
        from cosy.captions import write_captions

        path, caption_path = self.layout.audio_path(line), self.layout.caption_path(line)
        cues = line_cues(line.text, ev.samples, ev.sample_rate)
        try:
            with AudioFileWriter(path, ev.sample_rate) as writer:
                writer.write(ev.data)
                writer.commit()
        except OSError as exc:
            return self.cannot_write(line, path, exc)
        try:
            if caption_path is not None:
                write_captions(caption_path, cues)
            record: dict[str, Any] = {
                "line": line.number, "name": line.name, "text": line.text, "file": path.name,
                "duration_s": round(ev.samples / ev.sample_rate, 4), "sample_rate": ev.sample_rate,
                "bytes": path.stat().st_size, "worker": ev.done.worker, "attempts": line.tries - 1 + ev.done.attempt,
                "sha": line.digest, "captions": cues_to_json(cues)}
            if caption_path is not None:
                record["captions_file"] = caption_path.name
            self.manifest.write(record)
        except OSError as exc:
            for written in (path, caption_path):  # no file without its record
                if written is not None:
                    with contextlib.suppress(OSError):
                        written.unlink(missing_ok=True)
            return self.cannot_write(line, path, exc)
        return True

    def cannot_write(self, line: Line, path: Path, exc: OSError) -> bool:
        if is_no_space(exc):
            self.disk_full(exc)  # the line stays undone: --resume renders it
        else:
            self.fail(line, f"cannot write {path.name}: {exc.strerror or exc}")
        return False


def run_batch(eps: Endpoints, *, source: str, outdir: Path, fmt: str, voice: str | None, speed: float,
              resume: bool, window: int | None, retries: int, manifest_name: str, timeout: float,
              captions: str | None = None) -> int:
    from cosy.client import BrokerUnreachable, Client

    fmt = check_format(fmt.lower())
    if captions is not None and captions.lower() not in CAPTION_FORMATS:
        exits.fail(f"--captions must be srt or vtt, not {captions!r}", exits.USAGE)
    if not 0.25 <= speed <= 4.0:
        exits.fail(f"--speed {speed} is outside 0.25-4.0", exits.USAGE)
    try:
        if source == "-":
            parsed = parse_input(sys.stdin.buffer)
        else:
            with open(source, "rb") as f:
                parsed = parse_input(f)
    except OSError as exc:
        exits.fail(f"cannot read {source}: {exc.strerror}", exits.USAGE)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        probe = outdir / f".cosy-write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if is_no_space(exc):
            exits.fail(no_space_message(exc, outdir, 0, len(parsed.lines)), exits.NO_SPACE)
        exits.fail(f"cannot write to {outdir}: {exc.strerror}", exits.USAGE)
    layout = Layout(outdir.resolve(), fmt, captions.lower() if captions else None)
    outdir = layout.outdir
    manifest = Manifest(outdir / manifest_name)

    todo: deque[Line] = deque()
    skipped = 0
    missing_captions: list[tuple[Path, dict[str, Any]]] = []
    for line in parsed.lines:
        if len(line.text) > P.MAX_TEXT_CHARS:
            line.error = f"text is {len(line.text)} characters; the limit is {P.MAX_TEXT_CHARS}"
            parsed.invalid.append(line)
            continue
        path = layout.audio_path(line)
        if path.parent != outdir:  # cannot happen with safe_name; checked anyway
            line.error = "file name escapes the output folder"
            parsed.invalid.append(line)
            continue
        record = manifest.previous.get(line.number)
        if resume and is_complete(path, record, line):
            assert record is not None
            skipped += 1
            caption_path = layout.caption_path(line)
            if caption_path is not None and not caption_path.exists():
                missing_captions.append((caption_path, record))
            continue
        todo.append(line)
    lines = skipped + len(todo)  # the lines that can be written
    total = lines + len(parsed.invalid)
    try:
        for bad in parsed.invalid:
            manifest.write({"line": bad.number, "name": bad.name, "error": bad.error})
        _write_missing_captions(missing_captions)
    except OSError as exc:
        manifest.close()
        if is_no_space(exc):
            exits.fail(no_space_message(exc, outdir, skipped, lines), exits.NO_SPACE)
        exits.fail(f"cannot write in {outdir}: {exc.strerror or exc}", exits.JOB_FAILED)
    failed: list[Line] = list(parsed.invalid)
    if not todo:
        _summary(total, skipped, 0, failed, outdir, manifest)
        manifest.close()
        return exits.JOB_FAILED if failed else exits.OK

    client = Client(eps)
    try:
        client.connect()
        size = _window(eps, window)
    except BrokerUnreachable as exc:
        manifest.close()
        exits.fail(str(exc), exits.UNREACHABLE)
    except SystemExit:
        manifest.close()
        raise
    progress = Progress(lines, skipped)
    run_id = hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:8]
    batch = Batch(client, layout, manifest, progress, todo, failed, voice=voice, speed=speed, retries=retries,
                  timeout=timeout, window=size, run_id=run_id)
    try:
        batch.run()
    except KeyboardInterrupt:
        for job in batch.inflight:
            client.cancel(job)
        client.poll(0.05)
        progress.close()
        manifest.close()
        client.close()
        print(f"cosy batch: interrupted; {batch.written} files written, run again with --resume to continue",
              file=sys.stderr)
        return exits.INTERRUPTED
    progress.close()
    client.close()
    manifest.close()
    if batch.full is not None:
        for line in sorted(failed, key=lambda item: item.number):
            print(f"  line {line.number}: {line.error}", file=sys.stderr)
        print(f"cosy: {no_space_message(batch.full, outdir, skipped + batch.written, lines)}", file=sys.stderr)
        return exits.NO_SPACE
    _summary(total, skipped, batch.written, failed, outdir, manifest)
    return exits.JOB_FAILED if failed else exits.OK


def no_space_message(exc: OSError, outdir: Path, written: int, lines: int) -> str:
    """'no space left on /srv (ext4) (12 of 5000 lines written; free space, then run the same command with
    --resume)'; a quota or a read-only filesystem says so instead."""
    fix = "make it writable" if exc.errno == errno.EROFS else "free space"
    return (f"{describe(exc, outdir)} ({written} of {lines} lines written; {fix}, then run the same command "
            "with --resume)")


def _write_missing_captions(missing: list[tuple[Path, dict[str, Any]]]) -> None:
    """Captions asked for on --resume beside files of a run without them: from the manifest, no audio rewritten."""
    from cosy.captions import write_captions

    for path, record in missing:
        write_captions(path, cues_from_record(record))


def _summary(total: int, skipped: int, written: int, failed: list[Line], outdir: Path, manifest: Manifest) -> None:
    print(f"cosy batch: {written} written, {skipped} already complete, {len(failed)} failed, of {total} lines "
          f"-> {outdir} (manifest {manifest.path.name})", file=sys.stderr)
    for line in sorted(failed, key=lambda item: item.number):
        print(f"  line {line.number}: {line.error}", file=sys.stderr)
