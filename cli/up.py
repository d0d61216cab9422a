"""`cosy up`: a broker and N workers as separate processes, supervised in the foreground.

A worker that crashes is restarted (with a back-off), as systemd would with
Restart=on-failure; the broker meanwhile requeues its jobs. Ctrl-C or SIGTERM stops
the workers first, then the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from cosy.cli import exits
from cosy.endpoints import Endpoints, ensure_runtime_dir
from cosy.processes import stop_all

STOP_TIMEOUT_S = 10.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv)
        self.started_at = time.monotonic()

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
        w.start()
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
                    w.start()
    finally:
        _stop(pool)
        _stop([broker])
    return code
