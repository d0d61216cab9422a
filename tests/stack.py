"""Real processes for tests: a broker and workers started as `python -m cosy ...`, cleaned up by PID.

Every wait here polls a real condition (a socket file, the broker's status) with a deadline;
nothing sleeps for a fixed time and then assumes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cosy.polling import wait_for
from cosy.processes import stop_all

HEARTBEAT_MS = 200  # fast failure detection in tests: a dead worker is noticed in ~0.6 s


def _sigint_as_from_a_terminal() -> None:
    """A suite started in the background (`cmd &` without job control) has SIGINT ignored, and children
    inherit that, so Python would never raise KeyboardInterrupt in them: a CLI command gets Ctrl-C's default,
    as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Stack:
    """A broker plus workers in their own runtime directory."""

    def __init__(self, runtime_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.runtime_dir = runtime_dir or Path(tempfile.mkdtemp(prefix="cosy-", dir="/tmp"))
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("COSY_RUNTIME_DIR", None)
        self.broker: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}

    # --- processes ------------------------------------------------------------------

    def spawn(self, *args: str, name: str, stdin: Any = None, stdout: Any = None) -> subprocess.Popen:
        """`python -m cosy ARGS`, its output (or its stderr, with ``stdout``) in NAME.log."""
        return self.spawn_script("-m", "cosy", *args, name=name, stdin=stdin, stdout=stdout)

    def spawn_script(self, *args: str, name: str, stdin: Any = None, stdout: Any = None) -> subprocess.Popen:
        """`python ARGS` (a test's own helper, e.g. tests/race_worker.py), logged and stopped like the rest."""
        log = self.runtime_dir / f"{name}.log"
        self.logs.append(log)
        # The child gets its own copy of the log's descriptor: the parent closes its one at once.
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, *args], env=self.env, stdin=stdin,
                                    stdout=stdout if stdout is not None else out,
                                    stderr=subprocess.STDOUT if stdout is None else out)
        self.procs.append(proc)
        return proc

    def start_broker(self, *extra: str) -> subprocess.Popen:
        broker = self.broker = self.spawn("broker", "--runtime-dir", str(self.runtime_dir),
                                          "--heartbeat-ms", str(HEARTBEAT_MS), *extra, name="broker")
        lock = self.runtime_dir / "broker.lock"

        def bound() -> bool:  # this broker's pid in the lock file (a killed one leaves its sockets behind)
            if broker.poll() is not None:
                return True
            try:
                mine = lock.read_text().strip() == str(broker.pid)
            except OSError:
                return False
            return mine and (self.runtime_dir / "front.sock").exists()

        wait_for(bound, 15, "the broker's socket")
        assert broker.poll() is None, self.log_text()
        return broker

    def start_worker(self, engine: str = "piper", name: str | None = None, options: dict[str, Any] | None = None,
                     wait: bool = True, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        name = name or f"{engine}-{len(self.workers)}"
        opts: list[str] = []
        for k, v in (options or {}).items():
            opts += ["--option", f"{k}={v}"]
        proc = self.spawn("worker", "--engine", engine, "--name", name, "--runtime-dir", str(self.runtime_dir),
                          "--heartbeat-ms", str(HEARTBEAT_MS), *opts, *extra, name=name)
        self.workers[name] = proc
        if wait:
            self.wait_worker(name)
        return proc

    def wait_worker(self, name: str, timeout: float = 60) -> dict:
        def ready() -> dict | None:
            proc = self.workers[name]
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {proc.returncode}:\n{self.log_text()}")
            for w in self.status()["workers"]:
                if w["name"] == name:
                    return w
            return None

        return wait_for(ready, timeout, f"worker {name} to register", interval=0.05)

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(10)

    def stop(self) -> None:
        stop_all(self.procs[::-1], 5)  # the last started (clients, gateways, workers) first
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def log_text(self) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    # --- the CLI --------------------------------------------------------------------

    def cosy_background(self, *args: str) -> subprocess.Popen:
        """A CLI command left running (read its result with communicate()); a test that fails
        before it ends still has it stopped by PID, with the rest of the stack."""
        proc = subprocess.Popen([sys.executable, "-m", "cosy", *args, "--runtime-dir", str(self.runtime_dir)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_sigint_as_from_a_terminal)
        self.procs.append(proc)
        return proc

    def cosy(self, *args: str, input: bytes | None = None, timeout: float = 60,
             check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "cosy", *args, "--runtime-dir", str(self.runtime_dir)],
                              env=self.env, input=input, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"cosy {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stderr.decode(errors='replace')}\n{self.log_text()}")
        return proc

    def status(self) -> dict:
        proc = self.cosy("status", "--json", timeout=15)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr.decode(errors="replace"))
        return json.loads(proc.stdout)

    def start_tiny_cosyvoice(self, root: Path, voices_dir: Path, name: str = "cv", timeout: float = 300) -> None:
        """A real cosyvoice worker on tests/tiny_cosyvoice.py's random-weight model, serving ``voices_dir``."""
        from tiny_cosyvoice import make_tiny_model

        self.start_worker("cosyvoice", name=name, wait=False, options={
            "model_dir": make_tiny_model(root / "model"), "voices_dir": voices_dir, "cache_dir": root / "cache",
            "text_frontend": "false", "capacity": 2})
        self.wait_worker(name, timeout=timeout)

    @property
    def endpoints(self):
        from cosy.endpoints import ipc_endpoints

        return ipc_endpoints(self.runtime_dir)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="int16")
    return data, rate


def assert_prompt_without_aliasing(pcm: bytes, tone_hz: float, alias_hz: float, label: str = "") -> np.ndarray:
    """A job's prompt (16 kHz s16le) peaks at ``tone_hz`` and has next to nothing at ``alias_hz``, where a
    component above 8 kHz folds when the resampler does not low-pass first. Gives the samples (-1..1)."""
    out = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    spectrum = np.abs(np.fft.rfft(out))
    hz = np.fft.rfftfreq(len(out), 1 / 16000)
    assert abs(hz[np.argmax(spectrum)] - tone_hz) < 2, label
    peak = spectrum[np.argmin(abs(hz - tone_hz))]
    assert spectrum[np.argmin(abs(hz - alias_hz))] < 0.01 * peak, f"{label}: aliased onto {alias_hz:g} Hz"
    return out


def transcribe(audio: np.ndarray, rate: int) -> str:
    """Real speech recognition (PocketSphinx and its bundled English model) for intelligibility checks."""
    from pocketsphinx import Decoder

    n = int(len(audio) * 16000 / rate)
    x = np.interp(np.arange(n) * rate / 16000, np.arange(len(audio)), audio.astype(np.float32)).astype(np.int16)
    dec = Decoder(samprate=16000, loglevel="FATAL")
    dec.start_utt()
    dec.process_raw(x.tobytes(), full_utt=True)
    dec.end_utt()
    hyp = dec.hyp()
    return hyp.hypstr if hyp else ""


def run_until(client: Any, done: Any, timeout: float = 60) -> list:
    """Poll a cosy.client.Client until ``done(events so far)``; fail with the last events after ``timeout``."""
    import time

    events: list = []
    deadline = time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, f"timed out; events so far: {events[-5:]}"
        events += client.poll(0.05)
    return events
