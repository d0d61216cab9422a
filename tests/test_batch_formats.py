"""`cosy batch --format` in every file format and its captions, against real stacks.

Every format is read back by a real decoder (libsndfile through soundfile; PyAV for AAC, which libsndfile
does not read), the captions are parsed by pysubs2, and --resume recognises each format's files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pysubs2
import pytest
import soundfile as sf
from manifests import manifest_records, successes
from stack import Stack

from cosy.encode import FILE_FORMATS

AAC_PRIMING = 1024  # samples the AAC encoder puts before the audio (ADTS carries no gapless info)
TONE_HZ = 440.0


def decode(path: Path) -> tuple[np.ndarray, int, int]:
    """(samples as float, sample rate, samples of priming to discount) as a player decodes the file."""
    if path.suffix == ".aac":
        chunks, rate = [], 0
        with av.open(str(path)) as container:
            for frame in container.decode(audio=0):
                chunks.append(frame.to_ndarray().reshape(-1).astype(np.float32))
                rate = frame.sample_rate
        return np.concatenate(chunks), rate, AAC_PRIMING
    data, rate = sf.read(str(path), dtype="float32")
    return data, rate, 0


def peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)])


def check_captions(path: Path, duration_s: float, text: str) -> None:
    """The caption file parses, its cues are in order and do not overlap, and the last ends with the audio."""
    subs = pysubs2.load(str(path))
    assert subs.format == path.suffix[1:], subs.format
    assert len(subs) >= 1
    last_end = 0
    for event in subs:
        assert event.start >= last_end and event.end > event.start, (event.start, event.end)
        last_end = event.end
    assert abs(last_end / 1000 - duration_s) < 0.050, (last_end, duration_s)
    assert " ".join(event.plaintext for event in subs).split() == text.split()


LINES = ["the first line of the batch", "a second, longer line of the batch", "and the third"]


def test_every_format_round_trips_through_a_decoder_with_captions(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t", options={"frequency": TONE_HZ})
    source = tmp_path / "lines.txt"
    source.write_text("".join(f"{line}\n" for line in LINES))
    for i, fmt in enumerate(FILE_FORMATS):
        captions = ("srt", "vtt")[i % 2]
        outdir = tmp_path / fmt
        proc = stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", fmt, "--captions", captions)
        assert proc.returncode == 0, proc.stderr.decode() + stack.log_text()
        done = successes(outdir)
        assert sorted(done) == [1, 2, 3]
        for number, rec in done.items():
            path = outdir / rec["file"]
            assert rec["file"] == f"{number:06d}.{fmt}" and rec["bytes"] == path.stat().st_size
            audio, rate, priming = decode(path)
            heard_s = (len(audio) - priming) / rate
            if fmt == "aac":  # priming before, and the last 1024-sample frame padded: never shorter
                assert 0 <= heard_s - rec["duration_s"] < 1024 / rate, (heard_s, rec)
            else:  # exact, or within a sample of the resampling (opus at 24 kHz)
                assert abs(heard_s - rec["duration_s"]) < 0.001, (fmt, heard_s, rec)
            assert abs(peak_hz(audio, rate) - TONE_HZ) < 5, fmt
            # the manifest's column: one cue over the line's audio, timed from its samples
            (cue,) = rec["captions"]
            assert cue == {"start": 0.0, "end": round(rec["duration_s"], 3), "text": LINES[number - 1]}
            caption_file = outdir / f"{number:06d}.{captions}"
            assert rec["captions_file"] == caption_file.name
            check_captions(caption_file, heard_s, LINES[number - 1])
        assert not [p.name for p in outdir.iterdir() if p.name.endswith(".part") or p.name.startswith(".")]


def test_piper_lines_to_mp3_with_webvtt_captions(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("piper", name="p")
    lines = ["Good morning. The coffee is ready.", "Two sentences here! And a question?"]
    source = tmp_path / "lines.txt"
    source.write_text("".join(f"{line}\n" for line in lines))
    outdir = tmp_path / "out"
    proc = stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", "mp3", "--captions", "vtt",
                      timeout=180)
    assert proc.returncode == 0, proc.stderr.decode() + stack.log_text()
    for number, rec in successes(outdir).items():
        audio, rate, _ = decode(outdir / rec["file"])
        assert rate == rec["sample_rate"] and np.abs(audio).max() > 0.05  # speech, not silence
        assert abs(len(audio) / rate - rec["duration_s"]) < 0.001
        check_captions(outdir / f"{number:06d}.vtt", len(audio) / rate, lines[number - 1])
        assert (outdir / f"{number:06d}.vtt").read_text().startswith("WEBVTT")


@pytest.mark.parametrize("fmt", ["opus", "aac"])
def test_resume_in_a_non_wav_format_rewrites_nothing_and_adds_the_captions(
        stack: Stack, tmp_path: Path, fmt: str) -> None:
    stack.start_worker("tone", name="t")
    source = tmp_path / "lines.txt"
    source.write_text("".join(f"line {i} to render\n" for i in range(1, 7)))
    outdir = tmp_path / "out"
    first = stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", fmt)
    assert first.returncode == 0, first.stderr.decode()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outdir.glob(f"*.{fmt}")}
    assert len(before) == 6

    again = stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", fmt, "--resume",
                       "--captions", "srt")
    assert again.returncode == 0, again.stderr.decode()
    assert b"0 written, 6 already complete" in again.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outdir.glob(f"*.{fmt}")}
    assert after == before
    for rec in successes(outdir).values():  # captions from the manifest, for audio that was not rendered again
        check_captions(outdir / rec["file"].replace(f".{fmt}", ".srt"), rec["duration_s"], rec["text"])

    # A file cut short (as by a crash of another program) is not complete: only it is rendered again.
    victim = outdir / "000003" f".{fmt}"
    victim.write_bytes(victim.read_bytes()[:-100])
    third = stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", fmt, "--resume")
    assert third.returncode == 0, third.stderr.decode()
    assert b"1 written, 5 already complete" in third.stderr
    decode(victim)


def test_a_manifest_from_before_the_captions_column_still_resumes(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t")
    source = tmp_path / "lines.txt"
    source.write_text("one line\nanother line\n")
    for fmt in ("wav", "flac"):
        outdir = tmp_path / fmt
        assert stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", fmt).returncode == 0
        manifest = outdir / "manifest.jsonl"
        old = []  # the records as the previous version wrote them: no bytes, captions
        for rec in manifest_records(outdir):
            old.append({k: v for k, v in rec.items() if k not in ("bytes", "captions", "captions_file")})
        assert set(old[0]) == {"line", "name", "text", "file", "duration_s", "sample_rate", "worker", "attempts",
                               "sha"}
        manifest.write_text("".join(json.dumps(rec) + "\n" for rec in old))
        mtimes = {p.name: p.stat().st_mtime_ns for p in outdir.glob(f"*.{fmt}")}
        again = stack.cosy("batch", str(source), "--outdir", str(outdir), "--format", fmt, "--resume",
                           "--captions", "vtt")
        assert again.returncode == 0, again.stderr.decode()
        assert b"0 written, 2 already complete" in again.stderr
        assert {p.name: p.stat().st_mtime_ns for p in outdir.glob(f"*.{fmt}")} == mtimes
        check_captions(outdir / "000002.vtt", sf.info(str(outdir / f"000002.{fmt}")).duration, "another line")


def test_an_unknown_format_or_caption_kind_is_a_one_line_usage_error(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "lines.txt"
    source.write_text("hello\n")
    bad = stack.cosy("batch", str(source), "--outdir", str(tmp_path / "out"), "--format", "wma")
    err = bad.stderr.decode()
    assert bad.returncode == 2 and err.count("\n") == 1, err
    assert re.search(r"--format must be one of wav, flac, ogg, opus, mp3, aac, not 'wma'", err), err
    bad = stack.cosy("batch", str(source), "--outdir", str(tmp_path / "out"), "--captions", "ass")
    err = bad.stderr.decode()
    assert bad.returncode == 2 and err.count("\n") == 1 and "--captions must be srt or vtt" in err, err
    assert not (tmp_path / "out").exists()
