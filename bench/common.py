"""What every suite shares: child processes cleaned up by PID, percentiles, machine facts, JSON and plots."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cosy.polling import wait_for  # noqa: F401 - re-exported for the suites (C.wait_for)
from cosy.processes import stop_all

TONE_FAST = {"first_delay_ms": 0, "delay_ms": 0, "chunk_ms": 100, "ms_per_char": 20}


class Procs:
    """Child processes in one private runtime directory; stop() ends each by its PID."""

    def __init__(self, prefix: str = "cosy-bench-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("COSY_RUNTIME_DIR", None)

    def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **(env or {})})
        log.close()
        self.procs.append(proc)
        return proc

    def cosy(self, *args: str, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return self.spawn(["-m", "cosy", *args], name, env)

    def broker(self) -> subprocess.Popen:
        proc = self.cosy("broker", "--runtime-dir", str(self.dir), "--log-level", "WARNING", name="broker")
        wait_for(lambda: (self.dir / "front.sock").exists() or proc.poll() is not None, 20, "the broker")
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited: {self.log('broker')}")
        return proc

    def worker(self, engine: str, name: str, options: dict[str, Any] | None = None,
               env: dict[str, str] | None = None) -> subprocess.Popen:
        opts = [a for k, v in (options or {}).items() for a in ("--option", f"{k}={v}")]
        return self.cosy("worker", "--engine", engine, "--name", name, "--runtime-dir", str(self.dir),
                         "--log-level", "WARNING", *opts, name=name, env=env)

    def wait_workers(self, n: int, timeout: float = 90) -> None:
        from cosy.endpoints import ipc_endpoints

        def ready() -> bool:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a child exited with {p.returncode}; logs in {self.dir}")
            return len(_status(ipc_endpoints(self.dir))["workers"]) >= n

        wait_for(ready, timeout, f"{n} workers", interval=0.1)

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        stop_all(self.procs[::-1], 5)  # workers before the broker
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _status(eps: Any) -> dict[str, Any]:
    import zmq

    from cosy import protocol as P

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(eps.front)
    try:
        sock.send_multipart(P.StatusRequest().to_frames())
        if not sock.poll(2000):
            return {"workers": []}
        msg = P.decode(sock.recv_multipart(), P.BROKER_TO_CLIENT)
        return msg.status  # type: ignore[attr-defined]
    finally:
        sock.close(linger=0)


# --- numbers ------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def ms_summary(seconds: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in seconds]
    return {"p50": round(pct(ms, 50), 3), "p90": round(pct(ms, 90), 3), "p99": round(pct(ms, 99), 3),
            "mean": round(statistics.fmean(ms), 3) if ms else float("nan"), "n": len(ms)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


# --- the machine --------------------------------------------------------------------


def wait_low_load(limit: float = 1.5, max_wait_s: float = 60) -> float:
    """Wait (bounded) for the 1-minute load average to drop under limit; return it."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load > limit and time.monotonic() < deadline:
        print(f"  load {load:.2f} > {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def machine() -> dict[str, Any]:
    import zmq

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "kernel": platform.release()}


def write_result(out_dir: Path, suite: str, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}.json"
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def bar_plot(out_dir: Path, suite: str, title: str, groups: list[str], series: dict[str, list[float]],
             ylabel: str, log: bool = False) -> Path | None:
    """Grouped bars (one group per x label, one bar per series) saved as SUITE.png; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no plot; pip install 'cosy-tts[bench]')", file=sys.stderr)
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([g + width * (len(series) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    path = out_dir / f"{suite}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=False)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    return "\n".join(lines)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds a process (default: this one) has used so far."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
