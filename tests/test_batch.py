"""`cosy batch` against real stacks: every line ends as one complete file or a reported failure."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import soundfile as sf
from manifests import manifest_records, successes
from stack import Stack, wait_for


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def assert_valid_files(outdir: Path, expected_lines: int) -> None:
    done = successes(outdir)
    assert sorted(done) == list(range(1, expected_lines + 1))
    for rec in done.values():
        assert (outdir / rec["file"]).stat().st_mode & 0o777 == 0o666 & ~current_umask()
        info = sf.info(str(outdir / rec["file"]))
        assert info.frames > 0
        assert abs(info.frames / info.samplerate - rec["duration_s"]) < 0.001
    stray = [p.name for p in outdir.iterdir() if p.name.endswith(".part")]
    assert not stray, stray


def start_batch(stack: Stack, source: Path, outdir: Path, *extra: str) -> subprocess.Popen:
    return stack.cosy_background("batch", str(source), "--outdir", str(outdir), *extra)


@pytest.mark.timeout(900)  # 500 Piper lines: ~100 s on an idle 2-core machine, several minutes on a loaded one
def test_500_lines_on_two_piper_workers_survive_a_worker_kill_and_resume_rewrites_nothing(
        stack: Stack, tmp_path: Path) -> None:
    a = stack.start_worker("piper", name="a")
    stack.start_worker("piper", name="b")
    source = tmp_path / "lines.txt"
    source.write_text("".join(f"Line {i}.\n" for i in range(1, 501)))
    outdir = tmp_path / "wavs"
    batch = start_batch(stack, source, outdir)
    wait_for(lambda: len(manifest_records(outdir)) >= 100 or batch.poll() is not None, 300, "100 lines done")
    stack.kill(a)  # mid-batch: its job goes to b
    _, err = batch.communicate(timeout=600)
    assert batch.returncode == 0, err.decode()
    assert_valid_files(outdir, 500)
    workers = {rec["worker"] for rec in successes(outdir).values()}
    assert workers == {"a", "b"}
    before = {p.name: p.stat().st_mtime_ns for p in outdir.iterdir()}

    again = start_batch(stack, source, outdir, "--resume")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()
    assert b"0 written, 500 already complete" in err
    after = {p.name: p.stat().st_mtime_ns for p in outdir.iterdir() if p.name != "manifest.jsonl"}
    assert after == {k: v for k, v in before.items() if k != "manifest.jsonl"}


def test_input_formats_names_and_invalid_lines(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t", options={"voices": "alpha,beta"})
    source = tmp_path / "mixed.txt"
    source.write_bytes(
        b"plain line\n"
        b"\n"
        b"intro\tnamed by tab\n"
        b'{"text": "json line", "name": "../../escape", "voice": "beta"}\n'
        b"bad \xff\xfe utf8\n"
        b'{"no_text": 1}\n'
        b"   \n"
        b"last line\n")
    outdir = tmp_path / "out"
    proc = stack.cosy("batch", str(source), "--outdir", str(outdir), "--voice", "alpha")
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "line 5: invalid UTF-8" in err and "line 6: invalid JSON line" in err
    assert "Traceback" not in err
    files = sorted(p.name for p in outdir.iterdir())
    assert files == ["000001.wav", "000008.wav", "escape.wav", "intro.wav", "manifest.jsonl"]
    done = successes(outdir)
    assert done[4]["file"] == "escape.wav" and done[3]["text"] == "named by tab"
    assert not (tmp_path / "escape.wav").exists()


def test_unwritable_outdir_is_a_one_line_error(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "l.txt"
    source.write_text("hello\n")
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = stack.cosy("batch", str(source), "--outdir", str(blocker / "sub"))
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and "cannot write" in proc.stderr.decode()


def test_failed_lines_are_retried_then_listed(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t", options={"fail_on": "BROKEN"})
    source = tmp_path / "l.txt"
    source.write_text("fine one\nthis is BROKEN\nfine two\n")
    outdir = tmp_path / "out"
    proc = stack.cosy("batch", str(source), "--outdir", str(outdir), "--retries", "2")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "line 2: ENGINE_ERROR" in err
    (failure,) = [r for r in manifest_records(outdir) if "error" in r]
    assert failure["line"] == 2 and failure["attempts"] == 3
    assert sorted(successes(outdir)) == [1, 3]
    assert stack.status()["counters"]["failed"] == 3


def test_batch_survives_a_broker_kill_and_restart(stack: Stack, tmp_path: Path) -> None:
    for name in ("t1", "t2"):
        stack.start_worker("tone", name=name, options={"delay_ms": 20, "chunk_ms": 100, "capacity": 2})
    source = tmp_path / "l.txt"
    source.write_text("".join(f"line {i} of the batch\n" for i in range(1, 121)))
    outdir = tmp_path / "out"
    batch = start_batch(stack, source, outdir)
    wait_for(lambda: len(manifest_records(outdir)) >= 30 or batch.poll() is not None, 120, "30 lines done")
    assert stack.broker is not None
    stack.kill(stack.broker, signal.SIGKILL)
    old_pid = stack.broker.pid
    stack.start_broker()
    assert stack.broker.pid != old_pid
    _, err = batch.communicate(timeout=300)
    assert batch.returncode == 0, err.decode() + stack.log_text()
    assert b"broker restarted" in err
    assert_valid_files(outdir, 120)
    assert len(os.listdir(outdir)) == 121  # 120 files and the manifest: nothing twice


def test_busy_back_off_doubles_with_each_refusal_up_to_five_seconds() -> None:
    from cosy.cli.batch import busy_delay

    assert [busy_delay(n) for n in range(1, 9)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_a_line_refused_as_busy_again_and_again_backs_off_longer_each_time(bare_stack: Stack, tmp_path: Path) -> None:
    # A queue of one job: with one slow job running and one queued, the third line is refused (BUSY) until the
    # first finishes (at least 2 x 1.5 s of the worker's own delay), long enough for three refusals in a row.
    stack = bare_stack
    stack.start_broker("--max-queue", "1")
    stack.start_worker("tone", name="t", options={"capacity": 1, "delay_ms": 1500, "chunk_ms": 100})
    source = tmp_path / "l.txt"
    source.write_text("line one\nline two\nline three\n")
    outdir = tmp_path / "out"
    proc = stack.cosy("batch", str(source), "--outdir", str(outdir), "--window", "3", timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err + stack.log_text()
    assert_valid_files(outdir, 3)
    waits = [float(s) for s in re.findall(r"the broker is busy \(queue is full \(1 jobs\); retry later\); "
                                          r"waiting ([\d.]+) s before resubmitting", err)]
    assert waits[:3] == [0.2, 0.4, 0.8], err  # each a new high: printed once each, so it grew
    assert stack.status()["counters"]["rejected"] >= 3
