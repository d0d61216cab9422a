"""Chaos: workers killed at random, a broker killed and restarted, a stalled subscriber, a flood.

Each run is bounded in time and asserts the outputs (every file present, exactly the expected
length, nothing twice), not just an exit code. Marked slow; CI runs them with the rest.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zmq
from stack import Stack, wait_for

from cosy import protocol as P
from cosy.client import Accepted, Client, Completed, JobSpec, Rejected

pytestmark = pytest.mark.slow

TONE = {"delay_ms": 15, "chunk_ms": 100, "capacity": 2, "ms_per_char": 20}


def expected_samples(text: str, rate: int = 22050) -> int:
    return max(1, int(len(text) * 0.02 * rate))


def lines(n: int) -> list[str]:
    return [f"chaos line {i} " + "z" * (i % 37) for i in range(1, n + 1)]


def lines_file(folder: Path, texts: list[str]) -> Path:
    """The batch input: one text per line."""
    path = folder / "lines.txt"
    path.write_text("\n".join(texts) + "\n")
    return path


def check_outputs(outdir: Path, texts: list[str]) -> None:
    records = [json.loads(r) for r in (outdir / "manifest.jsonl").read_text().splitlines()]
    ok = [r for r in records if "file" in r]
    assert sorted(r["line"] for r in ok) == list(range(1, len(texts) + 1)), "a line is missing or written twice"
    files = sorted(p.name for p in outdir.glob("*.wav"))
    assert files == sorted(r["file"] for r in ok)
    for r in ok:
        audio, rate = sf.read(str(outdir / r["file"]), dtype="int16")
        assert len(audio) == expected_samples(texts[r["line"] - 1]), f"{r['file']} is truncated or spliced"
        t = np.arange(len(audio), dtype=np.float32) / rate
        reference = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        assert np.abs(audio.astype(int) - reference).max() <= 16, f"{r['file']} mixes attempts"


def test_twenty_random_worker_kills_during_a_200_line_batch(bare_stack: Stack, tmp_path: Path) -> None:
    s = bare_stack
    s.start_broker("--max-attempts", "10")
    rng = random.Random(42)
    slow = {**TONE, "delay_ms": 100}  # jobs of 0.3-1 s, so the batch outlasts 20 kills
    for i in range(2):
        s.start_worker("tone", name=f"w{i}", options=slow)
    texts = lines(200)
    source = lines_file(tmp_path, texts)
    outdir = tmp_path / "out"
    batch = s.cosy_background("batch", str(source), "--outdir", str(outdir), "--retries", "5")
    kills = 0
    deadline = time.monotonic() + 240
    while batch.poll() is None and time.monotonic() < deadline and kills < 24:
        busy = [w for w in s.status()["workers"] if w["running"]]
        if not busy:
            time.sleep(0.02)
            continue
        victim = rng.choice(busy)
        proc = s.workers[victim["name"]]
        s.kill(proc)
        kills += 1
        s.start_worker("tone", name=victim["name"], options=slow, wait=False)
        # Let some work happen before the next kill: wait for the replacement to register.
        try:
            s.wait_worker(victim["name"], timeout=30)
        except TimeoutError:
            pass
    _, err = batch.communicate(timeout=300)
    assert kills >= 20, f"only {kills} kills happened before the batch ended"
    assert batch.returncode == 0, err.decode()
    check_outputs(outdir, texts)
    assert s.status()["counters"]["retried"] >= 10


def test_broker_killed_twice_during_a_batch(bare_stack: Stack, tmp_path: Path) -> None:
    s = bare_stack
    s.start_broker()
    for i in range(2):
        s.start_worker("tone", name=f"w{i}", options=TONE)
    texts = lines(150)
    source = lines_file(tmp_path, texts)
    outdir = tmp_path / "out"
    batch = s.cosy_background("batch", str(source), "--outdir", str(outdir))
    manifest = outdir / "manifest.jsonl"
    for threshold in (30, 80):
        wait_for(lambda t=threshold: manifest.exists() and len(manifest.read_text().splitlines()) >= t
                 or batch.poll() is not None, 120, f"{threshold} lines")
        assert s.broker is not None
        s.kill(s.broker, signal.SIGKILL)
        s.start_broker()
    _, err = batch.communicate(timeout=300)
    assert batch.returncode == 0, err.decode()
    check_outputs(outdir, texts)


def test_stalled_subscriber_and_a_flood_do_not_stop_service(bare_stack: Stack, tmp_path: Path) -> None:
    s = bare_stack
    s.start_broker("--max-queue", "500", "--audio-hwm", "1000")
    s.start_worker("tone", name="w", options={**TONE, "delay_ms": 0})
    eps = s.endpoints
    ctx = zmq.Context()
    try:
        stalled = ctx.socket(zmq.SUB)  # subscribes to all audio and never reads
        stalled.setsockopt(zmq.RCVHWM, 10)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(eps.audio_out)
        with Client(eps) as flood:
            flood.connect()
            for i in range(3000):
                flood.submit(JobSpec("flood " + "f" * 30, job=f"flood-{i}", priority=P.BULK))
            answers = {"accepted": 0, "busy": 0}
            deadline = time.monotonic() + 60
            while sum(answers.values()) < 3000 and time.monotonic() < deadline:
                for e in flood.poll(0.05):
                    if isinstance(e, Rejected) and e.code == P.BUSY:
                        answers["busy"] += 1
                    elif isinstance(e, Accepted):
                        answers["accepted"] += 1
            assert sum(answers.values()) == 3000
            # The queue holds 500 (a few more as the worker drains it); the rest is turned away, not buffered.
            assert answers["busy"] >= 2000, answers
            texts = lines(40)
            source = lines_file(tmp_path, texts)
            outdir = tmp_path / "out"
            with Client(eps) as say:
                say.connect()
                say.submit(JobSpec("interactive during the flood"))
                done = wait_for(lambda: [e for e in say.poll(0.05) if isinstance(e, Completed)], 60, "the say")
                assert len(done[0].audio) == expected_samples("interactive during the flood")
            proc = s.cosy("batch", str(source), "--outdir", str(outdir), timeout=240)
            assert proc.returncode == 0, proc.stderr.decode()
            check_outputs(outdir, texts)
        stalled.close()
    finally:
        ctx.term()
    assert s.broker is not None and s.broker.poll() is None
