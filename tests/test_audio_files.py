"""Files written as the audio comes (cosy.audio.AudioFileWriter over cosy.encode) and captions (cosy.captions).

Every format `cosy say --out` and `cosy batch --format` take is decoded back by an independent decoder
(libsndfile for what it reads, FFmpeg through PyAV for AAC); a full disk gives the OSError, no file and no
temporary file; captions parse as SRT and WebVTT with pysubs2.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pysubs2
import pytest
import soundfile as sf
from tmpfs import fill, small_tmpfs

from cosy.audio import AudioFileWriter, format_for, write_atomic
from cosy.captions import CueTimer, caption_format_for, write_captions
from cosy.encode import FILE_FORMATS

RATE = 22050


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)


def decode(path: Path) -> tuple[np.ndarray, int]:
    """Samples (float, first channel) and rate, through a decoder other than our encoder."""
    if path.suffix == ".aac":
        import av

        with av.open(str(path)) as c:
            rate = c.streams.audio[0].rate
            data = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        return data.astype(np.float64), rate
    data, rate = sf.read(path, dtype="float64", always_2d=True)
    return data[:, 0], rate


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_every_file_format_round_trips(tmp_path: Path, fmt: str) -> None:
    pcm = tone(2.0)
    path = tmp_path / f"x.{fmt}"
    with AudioFileWriter(path, RATE) as w:
        for i in range(0, len(pcm), 3000):  # chunk by chunk, as audio arrives
            w.write(pcm[i:i + 3000].tobytes())
        w.commit()
    assert w.samples == len(pcm)
    data, rate = decode(path)
    seconds = len(data) / rate
    # Lossy codecs pad (AAC's priming and last frame, Opus at 24 kHz): a little over, never short.
    assert 2.0 - 0.001 <= seconds <= 2.0 + 0.1, (fmt, seconds)
    # The tone itself survives: the strongest frequency is 440 Hz.
    spectrum = np.abs(np.fft.rfft(data[:rate]))
    assert abs(int(np.argmax(spectrum)) - 440) < 5, fmt  # 1 Hz bins over one second
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "a temporary file was left behind"


def test_unknown_extension_lists_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        format_for(Path("out.xyz"))
    for suffix in (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aac"):
        assert suffix in str(err.value)


def test_an_aborted_file_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.flac"
    with pytest.raises(RuntimeError), AudioFileWriter(path, RATE) as w:
        w.write(tone(0.5))
        raise RuntimeError("the job failed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_full_disk_is_an_oserror_and_leaves_no_file(fmt: str) -> None:
    with small_tmpfs(600 * 1024) as where:
        fill(where, leave_bytes=16 * 1024)
        path = where / f"x.{fmt}"
        with pytest.raises(OSError) as err, AudioFileWriter(path, RATE) as w:
            pcm = tone(30.0)
            for i in range(0, len(pcm), 4096):
                w.write(pcm[i:i + 4096])
            w.commit()
        assert err.value.errno == errno.ENOSPC
        assert sorted(os.listdir(where)) == [".filler"]
        # With space again, the same file is written whole.
        os.unlink(where / ".filler")
        write_atomic(path, tone(1.0), RATE)
        assert abs(len(decode(path)[0]) / decode(path)[1] - 1.0) < 0.1


@pytest.mark.parametrize("suffix", [".srt", ".vtt"])
def test_captions_parse_and_follow_the_samples(tmp_path: Path, suffix: str) -> None:
    timer = CueTimer(RATE)
    texts = ["Hello there.", "A second, longer sentence --> with an arrow.", "Third."]
    for text, seconds in zip(texts, (1.25, 2.5, 0.75), strict=True):
        timer.add(text, int(seconds * RATE))
    path = tmp_path / f"c{suffix}"
    write_captions(path, timer.cues)
    subs = pysubs2.load(str(path))
    assert subs.format == suffix[1:]
    assert [(e.start, e.end) for e in subs] == [(0, 1250), (1250, 3750), (3750, 4500)]
    assert subs[0].plaintext == "Hello there."
    assert caption_format_for(path) == suffix[1:]
    with pytest.raises(ValueError, match=".srt or .vtt"):
        caption_format_for(tmp_path / "c.txt")
