"""`cosy batch` onto a full disk (a small tmpfs the test mounts as root): it stops cleanly, with whole files, a
manifest that matches them, no temporary files and exit 5; after space is freed --resume does the rest and
rewrites nothing."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import av
import pytest
import soundfile as sf
from manifests import manifest_records, successes
from stack import Stack
from tmpfs import fill, small_tmpfs

LINES = 24  # 16 KB each on the tmpfs (4 KB pages: a 0.2 s wav and its captions): 400 KB in all
MESSAGE = re.compile(r"^cosy: no space left on (?P<device>.+?) \((?P<n>\d+) of (?P<m>\d+) lines written; "
                     r"free space, then run the same command with --resume\)$", re.M)


def assert_whole(path: Path, rec: dict) -> None:
    assert path.stat().st_size == rec["bytes"]
    if path.suffix == ".aac":
        with av.open(str(path)) as container:
            samples = sum(frame.samples for frame in container.decode(audio=0))
        assert samples >= rec["duration_s"] * rec["sample_rate"] - 1
    else:
        info = sf.info(str(path))
        assert abs(info.frames / info.samplerate - rec["duration_s"]) < 0.001


def assert_consistent(outdir: Path, fmt: str) -> dict[int, dict]:
    """Every entry's files exist whole; no file without an entry; nothing temporary."""
    done = successes(outdir)
    expected = {"manifest.jsonl"}
    for number, rec in done.items():
        assert rec["file"] == f"{number:06d}.{fmt}"
        assert_whole(outdir / rec["file"], rec)
        expected |= {rec["file"], rec["captions_file"]}
        assert (outdir / rec["captions_file"]).read_text().startswith("1\n00:00:00,000 --> ")
    assert {p.name for p in outdir.iterdir()} == expected  # no .part, no stray file, nothing half-renamed
    return done


@pytest.mark.parametrize("fmt", ["wav", "aac"])
def test_a_batch_onto_a_nearly_full_disk_stops_with_exit_5_and_resume_finishes(
        stack: Stack, tmp_path: Path, fmt: str) -> None:
    for name in ("t1", "t2"):
        stack.start_worker("tone", name=name, options={"capacity": 2, "ms_per_char": 5})
    source = tmp_path / "lines.txt"
    source.write_text("".join(f"line {i:02d} of a batch too big for the disk\n"
                              for i in range(1, LINES + 1)))
    with small_tmpfs(600 * 1024) as disk:
        outdir = disk / "out"
        outdir.mkdir()
        fill(disk, leave_bytes=(100 if fmt == "wav" else 48) * 1024)
        args = ("batch", str(source), "--outdir", str(outdir), "--format", fmt, "--captions", "srt")
        full = stack.cosy(*args, timeout=120)
        err = full.stderr.decode()
        assert full.returncode == 5, err + stack.log_text()
        assert "Traceback" not in err and "Error" not in err, err
        match = MESSAGE.search(err)
        assert match, err
        assert match["device"] == f"{disk} (tmpfs)" and int(match["m"]) == LINES
        written = int(match["n"])
        assert 1 <= written < LINES, err
        done = assert_consistent(outdir, fmt)
        assert len(done) == written
        before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outdir.iterdir()
                  if p.name != "manifest.jsonl"}

        (disk / ".filler").unlink()  # space freed
        again = stack.cosy(*args, "--resume", timeout=120)
        err = again.stderr.decode()
        assert again.returncode == 0, err + stack.log_text()
        assert f"{LINES - written} written, {written} already complete, 0 failed" in err, err
        done = assert_consistent(outdir, fmt)
        assert sorted(done) == list(range(1, LINES + 1))
        after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outdir.iterdir() if p.name in before}
        assert after == before  # the files of the first run were not rewritten


def test_a_batch_onto_a_disk_with_no_room_at_all_writes_nothing(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t")
    source = tmp_path / "lines.txt"
    source.write_text("one\ntwo\nthree\n")
    with small_tmpfs(256 * 1024) as disk:
        outdir = disk / "out"
        outdir.mkdir()
        fill(disk, leave_bytes=0)
        full = stack.cosy("batch", str(source), "--outdir", str(outdir), timeout=60)
        err = full.stderr.decode()
        assert full.returncode == 5, err
        match = MESSAGE.search(err)
        assert match and (match["n"], match["m"]) == ("0", "3"), err
        assert {p.name for p in outdir.iterdir()} == {"manifest.jsonl"}
        assert (outdir / "manifest.jsonl").read_bytes() == b""


def test_a_manifest_record_that_does_not_fit_is_not_left_half_written(tmp_path: Path) -> None:
    from cosy.cli.batch import Manifest

    with small_tmpfs(64 * 1024) as disk:
        manifest = Manifest(disk / "manifest.jsonl")
        first = {"line": 1, "pad": "x" * 4000}
        manifest.write(first)  # one page of the tmpfs, nearly filled
        fill(disk, leave_bytes=0)
        size = (disk / "manifest.jsonl").stat().st_size
        with pytest.raises(OSError) as raised:
            manifest.write({"line": 2, "pad": "y" * 3000})  # starts in the page's tail, needs a page more
        assert raised.value.errno == errno.ENOSPC
        assert (disk / "manifest.jsonl").stat().st_size == size
        manifest.write({"line": 3})  # what still fits in the page is appended as a whole line
        manifest.close()
        assert [rec["line"] for rec in manifest_records(disk)] == [1, 3]
