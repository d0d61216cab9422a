"""`cosy up`: a broker and N workers as separate processes, supervised in the foreground.

A worker that crashes is restarted (with a back-off), as systemd would with
Restart=on-failure; the broker meanwhile requeues its jobs. A worker that exits with the
configuration-error code (2: a missing extra, a bad option, no model) is not restarted: the
same configuration would fail again. `cosy up` then stops the stack, prints the worker's message
once (however many workers hit it) and exits 2. Ctrl-C or SIGTERM stops the workers first, then
the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from cosy.cli import exits
from cosy.endpoints import Endpoints, ensure_runtime_dir
from cosy.processes import stop_all

STOP_TIMEOUT_S = 10.0
EXIT_CONFIG = 2  # what `cosy worker` exits with when its engine cannot start with this configuration
CONFIG_ERROR_PREFIX = b"cosy worker: cannot start"  # the worker's own line for it (workers/main.py)


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0
    started_at: float = 0.0
    relay: threading.Thread | None = None
    config_error: str = ""  # the worker's "cannot start" line, held back from the relay and printed once

    def start(self, relay_stderr: bool = False) -> None:
        """Start the process; with ``relay_stderr`` its stderr comes through a thread that passes every line
        on at once except the configuration-error line, which it keeps in ``config_error``."""
        self.config_error = ""
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE if relay_stderr else None)
        self.started_at = time.monotonic()
        if relay_stderr:
            self.relay = threading.Thread(target=self._relay, args=(self.proc.stderr,), daemon=True,
                                          name=f"relay-{self.name}")
            self.relay.start()

    def _relay(self, pipe: object) -> None:
        out = sys.stderr.buffer
        for line in iter(pipe.readline, b""):  # type: ignore[attr-defined]
            if line.startswith(CONFIG_ERROR_PREFIX):
                self.config_error = line.decode(errors="replace").strip()
                continue
            try:
                out.write(line)
                out.flush()
            except (OSError, ValueError):  # our stderr is gone: keep draining so the worker never blocks
                pass

    def exit_message(self) -> str:
        """After the process exited: its configuration-error line, once the relay has read everything."""
        if self.relay is not None:
            self.relay.join(timeout=5)
        return self.config_error

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _cosy(*args: str) -> list[str]:
    return [sys.executable, "-m", "cosy", *args]


def _wait_for_broker(eps: Endpoints, broker: Child, timeout_s: float = 15.0) -> bool:
    path = eps.front[len("ipc://"):]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not broker.alive:
            return False
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


def _devices(engine: str, workers: int | None) -> list[str | None]:
    """One worker per GPU for the GPU engine (found through NVML); N CPU workers otherwise."""
    if engine == "cosyvoice":
        from cosy.gpu import count_gpus

        gpus = count_gpus()
        if gpus:
            n = workers or gpus
            return [str(i % gpus) for i in range(n)]
    return [None] * (workers or 1)


def _report_config_errors(failed: list[Child]) -> None:
    """One line per distinct message: N workers with the same missing extra say it once."""
    messages = dict.fromkeys(w.exit_message() or f"{w.name} exited with {EXIT_CONFIG} (a configuration error)"
                             for w in failed)
    for message in messages:
        print(message, file=sys.stderr)
    print("cosy up: a worker cannot start with this configuration, so it is not restarted; stopping the stack",
          file=sys.stderr, flush=True)


def _stop(children: list[Child]) -> None:
    stop_all([c.proc for c in children], STOP_TIMEOUT_S)


def run_up(eps: Endpoints, engine: str, workers: int | None, options: dict[str, str], heartbeat_ms: int,
           log_level: str) -> int:
    assert eps.runtime_dir is not None
    ensure_runtime_dir(eps.runtime_dir)
    common = ["--runtime-dir", str(eps.runtime_dir), "--heartbeat-ms", str(heartbeat_ms),
              "--log-level", log_level]
    if engine == "piper" and "threads" not in options:
        # Each worker's onnxruntime would take every core: share them out instead.
        options = {**options, "threads": str(max(1, (os.cpu_count() or 1) // max(1, workers or 1)))}
    opts: list[str] = []
    for k, v in options.items():
        opts += ["--option", f"{k}={v}"]
    broker = Child("broker", _cosy("broker", *common))
    devices = _devices(engine, workers)
    pool = [Child(f"worker-{i}", _cosy("worker", "--engine", engine, "--name", f"{engine}-{i}", *opts, *common,
                                       *(["--device", dev] if dev is not None else [])))
            for i, dev in enumerate(devices)]
    workers = len(pool)
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    broker.start()
    if not _wait_for_broker(eps, broker):
        _stop([broker])
        exits.fail(f"the broker did not start (see its log above); runtime dir {eps.runtime_dir}", exits.USAGE)
    for w in pool:
        w.start(relay_stderr=True)
    print(f"cosy up: broker pid {broker.proc.pid}, {workers} {engine} worker(s) "  # type: ignore[union-attr]
          f"(pids {', '.join(str(w.proc.pid) for w in pool)}), runtime dir {eps.runtime_dir}",  # type: ignore[union-attr]
          file=sys.stderr, flush=True)
    code = exits.OK
    try:
        while not stopping:
            time.sleep(0.2)
            if not broker.alive:
                print(f"cosy up: the broker exited with {broker.proc.returncode}; stopping",  # type: ignore[union-attr]
                      file=sys.stderr)
                code = exits.JOB_FAILED
                break
            now = time.monotonic()
            config_errors = [w for w in pool if not w.alive and w.proc.returncode == EXIT_CONFIG]  # type: ignore[union-attr]
            if config_errors:
                _report_config_errors(config_errors)
                code = exits.USAGE
                break
            for w in pool:
                if w.alive or stopping:
                    continue
                if w.next_start == 0.0:
                    if now - w.started_at > 30:
                        w.restarts.clear()  # it ran a good while: a crash, not a crash loop
                    w.restarts = [t for t in w.restarts if now - t < 60] + [now]
                    if len(w.restarts) > 5:
                        print(f"cosy up: {w.name} keeps crashing; not restarting it", file=sys.stderr)
                        w.next_start = float("inf")
                        continue
                    w.next_start = now + 0.5 * 2 ** (len(w.restarts) - 1)
                    print(f"cosy up: {w.name} exited with {w.proc.returncode}; restarting",  # type: ignore[union-attr]
                          file=sys.stderr)
                if now >= w.next_start:
                    w.next_start = 0.0
                    w.start(relay_stderr=True)
    finally:
        _stop(pool)
        _stop([broker])
    return code
