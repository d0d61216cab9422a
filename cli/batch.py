"""`cosy batch`: render many lines across all workers; every line ends as one complete file or a reported failure.

- Input: one job per non-empty line; ``name<TAB>text`` lines; or JSONL lines with ``text``
  (and optionally ``name``, ``voice``, ``speed``), in the spirit of piper's --json-input.
- A bounded in-flight window (twice the workers' total capacity by default) keeps every
  worker busy without flooding the broker; BUSY rejections back off and retry.
- Files are written atomically (temporary file, then rename) under names that cannot
  escape --outdir; a JSONL manifest records each line's outcome as it happens.
- --resume skips lines whose file is complete and whose text is unchanged.
- Failed lines are retried (new job id), then listed at the end with a non-zero exit.
- A broker restart is survived: the client resubmits what was unfinished.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cosy import protocol as P
from cosy.cli import exits
from cosy.endpoints import Endpoints

NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
RETRYABLE = {P.WORKER_LOST, "INCOMPLETE_AUDIO", P.CLIENT_GONE, P.ENGINE_ERROR, P.BUSY}
FINAL = {P.BAD_REQUEST, P.TEXT_TOO_LONG, P.UNKNOWN_VOICE, P.DUPLICATE_JOB}


@dataclass
class Line:
    number: int  # 1-based line number in the input
    name: str
    text: str
    voice: str | None = None
    speed: float | None = None
    tries: int = 0
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
    """Append-only JSONL: one record per outcome; the last record of a line wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous: dict[int, dict[str, Any]] = {}
        if path.exists():
            for raw in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(raw)
                    self.previous[int(rec["line"])] = rec
                except (ValueError, KeyError, TypeError):
                    continue
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def is_complete(path: Path, record: dict[str, Any] | None, line: Line) -> bool:
    import soundfile as sf

    if record is None or record.get("sha") != line.digest or record.get("file") != path.name:
        return False
    try:
        info = sf.info(str(path))
    except Exception:
        return False
    return info.frames > 0 and abs(info.frames / info.samplerate - float(record.get("duration_s", -1))) < 0.01


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


def run_batch(eps: Endpoints, *, source: str, outdir: Path, fmt: str, voice: str | None, speed: float,
              resume: bool, window: int | None, retries: int, manifest_name: str, timeout: float) -> int:
    from cosy.audio import write_atomic
    from cosy.client import BrokerRestarted, BrokerUnreachable, Client, Completed, Failed, JobSpec, Rejected

    if fmt not in ("wav", "flac", "ogg"):
        exits.fail(f"--format must be wav, flac or ogg, not {fmt!r}", exits.USAGE)
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
        exits.fail(f"cannot write to {outdir}: {exc.strerror}", exits.USAGE)
    outdir = outdir.resolve()
    manifest = Manifest(outdir / manifest_name)
    run_id = hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:8]

    todo: deque[Line] = deque()
    skipped = 0
    for line in parsed.lines:
        if len(line.text) > P.MAX_TEXT_CHARS:
            line.error = f"text is {len(line.text)} characters; the limit is {P.MAX_TEXT_CHARS}"
            parsed.invalid.append(line)
            continue
        path = outdir / f"{line.name}.{fmt}"
        if path.parent != outdir:  # cannot happen with safe_name; checked anyway
            line.error = "file name escapes the output folder"
            parsed.invalid.append(line)
            continue
        if resume and is_complete(path, manifest.previous.get(line.number), line):
            skipped += 1
            continue
        todo.append(line)
    for bad in parsed.invalid:
        manifest.write({"line": bad.number, "name": bad.name, "error": bad.error})
    total = skipped + len(todo) + len(parsed.invalid)
    if not todo:
        _summary(total, skipped, 0, parsed.invalid, outdir, manifest)
        manifest.close()
        return exits.JOB_FAILED if parsed.invalid else exits.OK

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
    progress = Progress(total - len(parsed.invalid), skipped)
    inflight: dict[str, Line] = {}
    failed: list[Line] = list(parsed.invalid)
    written = 0
    try:
        while todo or inflight:
            now = time.monotonic()
            while todo and len(inflight) < size and todo[0].not_before <= now:
                line = todo.popleft()
                line.tries += 1
                line.job = f"b{run_id}-{line.number}-{line.tries}"
                inflight[line.job] = line
                client.submit(JobSpec(line.text, line.voice or voice, line.speed or speed, P.BULK, line.job))
                line.not_before = now + timeout  # the deadline while in flight
            for ev in client.poll(0.05):
                if isinstance(ev, BrokerRestarted):
                    print(f"cosy batch: the broker restarted; resubmitted {ev.resubmitted} jobs", file=sys.stderr)
                    continue
                line = inflight.get(getattr(ev, "job", ""))
                if line is None:
                    continue
                if isinstance(ev, Completed):
                    del inflight[ev.job]
                    path = outdir / f"{line.name}.{fmt}"
                    write_atomic(path, ev.audio, ev.sample_rate)
                    seconds = len(ev.audio) / ev.sample_rate
                    manifest.write({"line": line.number, "name": line.name, "text": line.text, "file": path.name,
                                    "duration_s": round(seconds, 4), "sample_rate": ev.sample_rate,
                                    "worker": ev.done.worker, "attempts": line.tries - 1 + ev.done.attempt,
                                    "sha": line.digest})
                    written += 1
                    progress.update(True, seconds)
                elif isinstance(ev, (Failed, Rejected)):
                    del inflight[ev.job]
                    _retry_or_fail(line, ev.code, ev.message, retries, todo, failed, manifest, progress)
            now = time.monotonic()
            for job, line in list(inflight.items()):
                if now > line.not_before:
                    client.cancel(job)
                    client.forget(job)
                    del inflight[job]
                    _retry_or_fail(line, "TIMEOUT", f"no audio after {timeout:g} s", retries, todo, failed,
                                   manifest, progress)
            progress.tick()
    except KeyboardInterrupt:
        for job in inflight:
            client.cancel(job)
        client.poll(0.05)
        progress.close()
        manifest.close()
        client.close()
        print(f"cosy batch: interrupted; {written} files written, run again with --resume to continue",
              file=sys.stderr)
        return exits.INTERRUPTED
    progress.close()
    client.close()
    _summary(total, skipped, written, failed, outdir, manifest)
    manifest.close()
    return exits.JOB_FAILED if failed else exits.OK


def _retry_or_fail(line: Line, code: str, message: str, retries: int, todo: deque[Line], failed: list[Line],
                   manifest: Manifest, progress: Progress) -> None:
    if code == P.BUSY:
        line.tries -= 1  # the broker never took it: not an attempt
        line.not_before = time.monotonic() + min(5.0, 0.2 * 2 ** min(line.tries, 5))
        todo.appendleft(line)
        return
    if code not in FINAL and line.tries <= retries:
        line.not_before = time.monotonic() + 0.5 * line.tries
        todo.append(line)
        return
    line.error = f"{code}: {message}"
    failed.append(line)
    manifest.write({"line": line.number, "name": line.name, "text": line.text, "error": line.error,
                    "attempts": line.tries})
    progress.update(False)


def _summary(total: int, skipped: int, written: int, failed: list[Line], outdir: Path, manifest: Manifest) -> None:
    print(f"cosy batch: {written} written, {skipped} already complete, {len(failed)} failed, of {total} lines "
          f"-> {outdir} (manifest {manifest.path.name})", file=sys.stderr)
    for line in sorted(failed, key=lambda item: item.number):
        print(f"  line {line.number}: {line.error}", file=sys.stderr)
