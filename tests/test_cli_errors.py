"""Bad input to the CLI: one clear line, a documented exit code, never a traceback; the stack keeps serving."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from stack import Stack, read_wav, wait_for

USAGE, UNREACHABLE, INTERRUPTED = 2, 3, 130


def one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cosy: "), lines
    assert needle in lines[0], lines[0]


@pytest.fixture
def served(stack: Stack) -> Stack:
    stack.start_worker("tone", name="t", options={"voices": "alpha,beta"})
    return stack


def test_bad_say_input_gets_one_line_each(served: Stack, tmp_path: Path) -> None:
    s = served
    out = str(tmp_path / "o.wav")
    big = tmp_path / "big.txt"  # 300 kB: more than one argument may carry
    big.write_text("x" * 300_000)
    cases = [
        (("say", "", "--no-play", "--out", out), b"", "empty"),
        (("say", "   \n\t ", "--no-play", "--out", out), b"", "empty"),
        (("say", "hi", "--voice", "gamma", "--no-play", "--out", out), b"", "alpha, beta"),
        (("say", "-f", str(tmp_path / "missing.txt"), "--no-play", "--out", out), b"", "cannot read"),
        (("say", "hi", "--no-play", "--out", str(tmp_path / "no" / "dir" / "o.wav")), b"", "does not exist"),
        (("say", "hi", "--no-play", "--out", str(tmp_path / "o.mp4")), b"", "must be one of"),
        (("say", "-", "--no-play", "--out", out), b"caf\xe9 \xff", "not valid UTF-8"),
        (("say", "hi", "--speed", "9", "--no-play", "--out", out), b"", "outside 0.25-4.0"),
        (("say", "-f", str(big), "--no-play", "--out", out), b"", "at most 20000"),
        (("say", "-", "--no-play", "--out", out), b"x" * 300_000, "at most 20000"),
    ]
    for args, stdin, needle in cases:
        one_line_error(s.cosy(*args, input=stdin), USAGE, needle)
    # A 300 kB text straight to the broker (not through the CLI's own check) is refused by the broker.
    from cosy.client import Client, JobSpec, Rejected

    with Client(s.endpoints) as client:
        client.connect()
        client.submit(JobSpec("y" * 300_000))
        (rejected,) = wait_for(lambda: [e for e in client.poll(0.05) if isinstance(e, Rejected)], 10, "a rejection")
        assert rejected.code == "TEXT_TOO_LONG"
    ok = s.cosy("say", "still serving", "--no-play", "--out", out, check=True)
    assert ok.returncode == 0 and len(read_wav(Path(out))[0]) > 0


def test_bad_batch_input_gets_one_line_each(served: Stack, tmp_path: Path) -> None:
    lines = tmp_path / "l.txt"
    lines.write_text("hello\n")
    one_line_error(served.cosy("batch", str(tmp_path / "missing.txt"), "--outdir", str(tmp_path / "o")),
                   USAGE, "cannot read")
    one_line_error(served.cosy("batch", str(lines), "--outdir", str(tmp_path / "o"), "--speed", "0"),
                   USAGE, "outside 0.25-4.0")
    one_line_error(served.cosy("batch", str(lines), "--outdir", str(tmp_path / "o"), "--format", "mp4"),
                   USAGE, "--format")


def test_no_broker_is_exit_3_with_one_line(bare_stack: Stack, tmp_path: Path) -> None:
    for args in (("say", "hi", "--no-play", "--out", str(tmp_path / "o.wav")), ("status",),
                 ("batch", "-", "--outdir", str(tmp_path / "o"))):
        one_line_error(bare_stack.cosy(*args, input=b"a line\n"), UNREACHABLE, "no broker")


def test_ctrl_c_stops_say_and_cancels_its_job(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t", options={"delay_ms": 100, "capacity": 1})
    say = stack.cosy_background("say", "z" * 300, "--no-play", "--out", str(tmp_path / "o.wav"))
    wait_for(lambda: stack.status()["running"] == 1, 30, "the job to start")
    say.send_signal(signal.SIGINT)
    _, err = say.communicate(timeout=30)
    assert say.returncode == INTERRUPTED and b"Traceback" not in err
    st = wait_for(lambda: (lambda st: st if st["running"] == 0 else None)(stack.status()), 10, "the cancel")
    assert st["counters"]["cancelled"] == 1 and st["counters"]["done"] == 0
    assert not (tmp_path / "o.wav").exists()


def test_say_backs_off_while_the_queue_is_full(bare_stack: Stack, tmp_path: Path) -> None:
    s = bare_stack
    s.start_broker("--max-queue", "1")
    from cosy import protocol as P
    from cosy.client import Accepted, Client, JobSpec

    with Client(s.endpoints) as filler:  # no worker yet: one job fills the queue
        filler.connect()
        filler.submit(JobSpec("fill", priority=P.BULK))
        wait_for(lambda: [e for e in filler.poll(0.05) if isinstance(e, Accepted)], 10, "the filler")
        say = s.cosy_background("say", "patient", "--no-play", "--out", str(tmp_path / "o.wav"))
        wait_for(lambda: s.status()["counters"]["rejected"] >= 2, 30, "say to be turned away twice")
        s.start_worker("tone", name="t")  # the queue drains; say gets in
        _, err = say.communicate(timeout=60)
        filler.poll(0.05)
    assert say.returncode == 0, err.decode()
    assert b"retrying" in err
    assert len(read_wav(tmp_path / "o.wav")[0]) == int(len("patient") * 0.02 * 22050)
