"""Captions for rendered speech: one cue per sentence, timed from the audio actually produced.

A cue's times come from sample counts (where a sentence's audio starts and ends in the output), never
from an estimate of speaking rate. SRT (``00:00:01,250``) and WebVTT (``00:00:01.250``) are written;
the format follows the file's extension.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CAPTION_SUFFIXES = {".srt": "srt", ".vtt": "vtt"}


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


class CueTimer:
    """Turns per-sentence sample counts into cues: ``add(text, samples)`` in output order."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.samples = 0
        self.cues: list[Cue] = []

    def add(self, text: str, samples: int) -> Cue:
        start = self.samples
        self.samples += samples
        cue = Cue(start / self.sample_rate, self.samples / self.sample_rate, " ".join(text.split()))
        self.cues.append(cue)
        return cue


def caption_format_for(path: Path) -> str:
    fmt = CAPTION_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot write captions to {Path(path).name!r}: the extension must be .srt or .vtt")
    return fmt


def _stamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _text(cue: Cue, fmt: str) -> str:
    # A blank line ends a cue in both formats, and WebVTT reserves "-->" for timings.
    text = " ".join(cue.text.split())
    return text.replace("-->", "->") if fmt == "vtt" else text


def render(cues: Iterable[Cue], fmt: str) -> str:
    """The captions as SRT (``fmt="srt"``) or WebVTT (``"vtt"``)."""
    sep = "," if fmt == "srt" else "."
    out = ["WEBVTT", ""] if fmt == "vtt" else []
    for i, cue in enumerate(cues, 1):
        if fmt == "srt":
            out.append(str(i))
        out.append(f"{_stamp(cue.start_s, sep)} --> {_stamp(cue.end_s, sep)}")
        out.append(_text(cue, fmt))
        out.append("")
    return "\n".join(out)


def write_captions(path: Path, cues: Iterable[Cue]) -> None:
    """Write the captions atomically (temporary file, fsync, rename), in the format the extension names."""
    from cosy.diskspace import write_atomic

    path = Path(path)
    write_atomic(path, render(cues, caption_format_for(path)).encode("utf-8"))
