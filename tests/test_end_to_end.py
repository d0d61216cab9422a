"""The whole path with real processes: client -> broker -> worker -> PUB -> broker -> SUB."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from stack import Stack, read_wav, transcribe, wait_for

from cosy import protocol as P
from cosy.client import Client, Completed, JobSpec

FOX = "The quick brown fox jumps over the lazy dog."
FOX_WORDS = {"quick", "brown", "fox", "jumps", "over", "lazy", "dog"}


def tone_samples(text: str, ms_per_char: float = 20, rate: int = 22050, speed: float = 1.0) -> int:
    return max(1, int(len(text) * ms_per_char / 1000 * rate / speed))


def test_cosy_up_then_say_writes_intelligible_speech(bare_stack: Stack, tmp_path: Path) -> None:
    s = bare_stack
    up = s.spawn("up", "--runtime-dir", str(s.runtime_dir), "--engine", "piper", "--workers", "1", name="up")
    wait_for(lambda: (s.runtime_dir / "front.sock").exists() and s.status()["workers"], 60, "cosy up to be ready")
    out = tmp_path / "out.wav"
    proc = s.cosy("say", FOX, "--no-play", "--out", str(out), check=True)
    assert proc.returncode == 0
    audio, rate = read_wav(out)
    assert rate == 22050
    assert len(audio) / rate >= 2.0
    heard = set(transcribe(audio, rate).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"
    # cosy up stops its children on SIGTERM.
    up.send_signal(signal.SIGTERM)
    assert up.wait(15) == 0
    assert not (s.runtime_dir / "front.sock").exists()


def test_twenty_concurrent_says_on_two_workers(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("piper", name="w1")
    stack.start_worker("piper", name="w2")
    procs = []
    for i in range(20):
        out = tmp_path / f"{i}.wav"
        procs.append((out, stack.cosy_background("say", f"Sentence number {i}.", "--no-play", "--out", str(out))))
    for out, proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        audio, rate = read_wav(out)
        assert rate == 22050 and len(audio) > rate // 2
    done = {w["name"]: w["jobs_done"] for w in stack.status()["workers"]}
    assert sum(done.values()) == 20
    assert done["w1"] > 0 and done["w2"] > 0, done


def test_worker_killed_mid_job_completes_elsewhere_with_one_attempt(stack: Stack, tmp_path: Path) -> None:
    opts = {"delay_ms": 60, "chunk_ms": 100, "capacity": 1}
    a = stack.start_worker("tone", name="a", options=opts)
    b = stack.start_worker("tone", name="b", options=opts)
    text = "x" * 150  # 3 s of tone in 30 chunks, about 1.8 s to synthesize
    out = tmp_path / "out.wav"
    say = stack.cosy_background("say", text, "--no-play", "--out", str(out))
    busy = wait_for(lambda: [w for w in stack.status()["workers"] if w["running"]], 30, "a busy worker")
    victim = a if busy[0]["name"] == "a" else b
    assert busy[0]["pid"] == victim.pid
    stack.kill(victim)
    _, err = say.communicate(timeout=60)
    assert say.returncode == 0, err.decode()
    assert b"attempt 2" in err
    audio, rate = read_wav(out)
    expected = tone_samples(text)
    assert len(audio) == expected  # exactly one complete attempt, nothing of the dead one
    t = np.arange(expected, dtype=np.float32) / rate  # as the tone engine computes it
    reference = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    assert np.abs(audio.astype(int) - reference).max() <= 16  # a spliced attempt would jump by thousands
    survivors = stack.status()["workers"]
    assert [w["name"] for w in survivors] != [busy[0]["name"]]
    assert stack.status()["counters"]["retried"] >= 1


def _garbage_frames(rng: np.random.Generator) -> list[list[bytes]]:
    return [
        [rng.bytes(int(rng.integers(1, 64)))],
        [rng.bytes(16) for _ in range(int(rng.integers(2, 9)))],
        [P.PROTO, b"SUBMIT", b"\x81\xa3job"],  # truncated msgpack
        [P.PROTO, b"SUBMIT", rng.bytes(100)],
        [P.PROTO, b"READY", P.packb({"worker": 1})],
        [P.PROTO, b"DONE", P.packb({"job": "x", "run": "y"})],
        [P.PROTO, b"STATUS", P.packb([1])],
        [b"\x00" * (2 << 20)],  # over MAXMSGSIZE: the peer gets disconnected
        [],
    ]


def test_garbage_on_every_socket_leaves_the_broker_serving(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t")
    eps = stack.endpoints
    ctx = zmq.Context()
    rng = np.random.default_rng(7)
    try:
        for endpoint, kind in ((eps.front, zmq.DEALER), (eps.back, zmq.DEALER), (eps.audio_in, zmq.PUB),
                               (eps.audio_out, zmq.XSUB), (eps.front, zmq.PUSH), (eps.back, zmq.REQ)):
            for frames in _garbage_frames(rng):
                sock = ctx.socket(kind)
                sock.setsockopt(zmq.LINGER, 100)
                sock.connect(endpoint)
                if frames:
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                sock.close()
        # Raw bytes that are not even ZMTP, straight into each ipc socket.
        for endpoint in eps.as_dict().values():
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.connect(endpoint[len("ipc://"):])
            raw.sendall(rng.bytes(4096))
            raw.close()
    finally:
        ctx.term()
    out = tmp_path / "after.wav"
    stack.cosy("say", "still here", "--no-play", "--out", str(out), check=True)
    audio, _ = read_wav(out)
    assert len(audio) == tone_samples("still here")
    st = stack.status()
    assert st["counters"]["malformed"] > 0
    assert stack.broker is not None and stack.broker.poll() is None


def test_dropped_chunk_is_detected_and_repaired(stack: Stack) -> None:
    stack.start_worker("tone", name="t", options={"chunk_ms": 50})
    dropped: list[int] = []

    def drop(h: P.ChunkHeader) -> bool:
        if h.seq in (1, 4) or h.final:
            dropped.append(h.seq)
            return True
        return False

    text = "y" * 40
    with Client(stack.endpoints, drop_chunk=drop) as client:
        client.connect()
        client.submit(JobSpec(text))
        result = None
        deadline = time.monotonic() + 30
        while result is None and time.monotonic() < deadline:
            for ev in client.poll(0.05):
                assert not hasattr(ev, "code"), ev
                if isinstance(ev, Completed):
                    result = ev
    assert result is not None
    assert sorted(dropped)[:2] == [1, 4]
    assert result.replayed >= 3
    assert len(result.audio) == tone_samples(text) == result.done.samples


def test_unrepairable_gap_is_reported_not_truncated(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker("--replay-buffer-mb", "0")
    s.start_worker("tone", name="t", options={"chunk_ms": 50})
    with Client(s.endpoints, drop_chunk=lambda h: h.seq == 2) as client:
        client.connect()
        client.submit(JobSpec("z" * 40))
        events = []
        deadline = time.monotonic() + 30
        while client.pending() and time.monotonic() < deadline:
            events += client.poll(0.05)
    failures = [e for e in events if getattr(e, "code", "") == "INCOMPLETE_AUDIO"]
    assert failures and not [e for e in events if isinstance(e, Completed)]


def test_status_json_reports_workers_with_pid_and_state(stack: Stack) -> None:
    proc = stack.start_worker("tone", name="t1", options={"voices": "alpha,beta"})
    st = stack.status()
    (w,) = st["workers"]
    assert w["pid"] == proc.pid and w["state"] == "idle" and w["voices"] == ["alpha", "beta"]
    assert st["broker"]["pid"] == stack.broker.pid  # type: ignore[union-attr]
    assert st["queue"] == {"interactive": 0, "bulk": 0}


def test_unknown_voice_names_the_voices_that_exist(stack: Stack) -> None:
    stack.start_worker("tone", name="t1", options={"voices": "alpha,beta"})
    proc = stack.cosy("say", "hello", "--voice", "gamma", "--no-play", "--out", "/dev/null.wav")
    err = proc.stderr.decode()
    assert proc.returncode == 2
    assert "alpha" in err and "beta" in err and "Traceback" not in err


def test_second_broker_on_the_same_runtime_dir_is_refused(stack: Stack) -> None:
    proc = subprocess.run([sys.executable, "-m", "cosy", "broker", "--runtime-dir", str(stack.runtime_dir)],
                          env=stack.env, capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"already running" in proc.stderr
    assert stack.status()["broker"]["pid"] == stack.broker.pid  # type: ignore[union-attr]


def test_runtime_dir_and_sockets_are_private(stack: Stack) -> None:
    assert (os.stat(stack.runtime_dir).st_mode & 0o077) == 0
    for name in ("front.sock", "back.sock", "audio-in.sock", "audio.sock"):
        assert (os.stat(stack.runtime_dir / name).st_mode & 0o077) == 0, name


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_stops_cleanly_on_signal(bare_stack: Stack, sig: int) -> None:
    broker = bare_stack.start_broker()
    broker.send_signal(sig)
    assert broker.wait(10) == 0
    assert not (bare_stack.runtime_dir / "front.sock").exists()


def test_voices_added_while_running_become_available_without_restart(stack: Stack, tmp_path: Path) -> None:
    voices = tmp_path / "voices.txt"
    voices.write_text("alpha")
    proc = stack.start_worker("tone", name="t", options={"voices_file": str(voices)})
    refused = stack.cosy("say", "hi", "--voice", "beta", "--no-play", "--out", str(tmp_path / "x.wav"))
    assert refused.returncode == 2 and b"alpha" in refused.stderr
    voices.write_text("alpha,beta")
    wait_for(lambda: "beta" in stack.status()["voices"], 30, "the worker to announce the new voice")
    stack.cosy("say", "hi", "--voice", "beta", "--no-play", "--out", str(tmp_path / "b.wav"), check=True)
    (w,) = stack.status()["workers"]
    assert w["pid"] == proc.pid and w["jobs_done"] == 1  # same process, nothing restarted


def test_default_voice_name_means_each_workers_default(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker("tone", name="t", options={"voices": "alpha,beta"})
    stack.cosy("say", "hi", "--voice", "default", "--no-play", "--out", str(tmp_path / "d.wav"), check=True)
    audio, _ = read_wav(tmp_path / "d.wav")
    assert len(audio) == tone_samples("hi")


def test_a_job_with_its_own_prompt_is_refused_where_no_worker_clones(stack: Stack) -> None:
    """A tone (or Piper) worker cannot clone: a job with its own prompt audio gets CANNOT_CLONE, naming the
    engines that can, and the stack keeps serving ordinary jobs."""
    from cosy.client import Rejected

    stack.start_worker("tone", name="t")
    with Client(stack.endpoints) as client:
        client.connect()
        client.submit(JobSpec("Hello.", job="clone-1", prompt_audio=b"\x00\x01" * 16000, prompt_text="Words."))
        client.submit(JobSpec("Hello.", job="plain-1"))
        events: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while len(events) < 2 and time.monotonic() < deadline:
            for ev in client.poll(0.05):
                if isinstance(ev, (Rejected, Completed)):
                    events[ev.job] = ev
    refused, served = events["clone-1"], events["plain-1"]
    assert isinstance(refused, Rejected) and refused.code == P.CANNOT_CLONE
    assert "cosyvoice" in refused.message and "tone" in refused.message and refused.voices == ["tone"]
    assert isinstance(served, Completed)
    assert [w["clone"] for w in stack.status()["workers"]] == [False]
