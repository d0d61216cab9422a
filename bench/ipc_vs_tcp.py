"""What the network hop costs: submit -> first audio chunk over ipc vs loopback tcp.

Starts two stacks side by side, each a real broker plus one `tone` worker (no synthesis time, so
only transport and scheduling remain): one on ipc sockets, one bound to tcp://127.0.0.1:PORT with
the worker connecting over tcp. Jobs alternate between the two, so machine noise hits both alike.

    python bench/ipc_vs_tcp.py --jobs 300

Prints p50/p90/p99 of submit -> first chunk and submit -> complete (all chunks and DONE) for both.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cosy.client import Audio, Client, Completed, Failed, JobSpec, Rejected
from cosy.endpoints import Endpoints, free_tcp_base, ipc_endpoints, tcp_endpoints

TONE_OPTIONS = {"first_delay_ms": 0, "delay_ms": 0, "chunk_ms": 100, "ms_per_char": 20}
TEXT = "Hello there, general."  # 21 chars -> 420 ms of tone in 5 chunks


@dataclass
class BenchStack:
    name: str
    runtime_dir: Path
    endpoints: Endpoints
    connect_args: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, *args: str) -> subprocess.Popen:
        log = open(self.runtime_dir / f"{args[0]}.log", "ab")  # noqa: SIM115 - the child keeps it
        proc = subprocess.Popen([sys.executable, "-m", "cosy", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.procs.append(proc)
        return proc

    def start(self, bind: list[str]) -> None:
        self.spawn("broker", "--runtime-dir", str(self.runtime_dir), "--log-level", "WARNING", *bind)
        with Client(self.endpoints) as c:
            deadline = time.monotonic() + 20
            while True:
                try:
                    c.connect(1.0)
                    break
                except ConnectionError:
                    if time.monotonic() > deadline or self.procs[0].poll() is not None:
                        raise RuntimeError(f"{self.name} broker did not start; see {self.runtime_dir}") from None
                    time.sleep(0.05)
        opts = [a for k, v in TONE_OPTIONS.items() for a in ("--option", f"{k}={v}")]
        self.spawn("worker", "--engine", "tone", "--name", f"bench-{self.name}", "--log-level", "WARNING",
                   *self.connect_args, *opts)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def one_job(client: Client, timeout_s: float = 10.0) -> tuple[float, float]:
    """Seconds from submit to the first chunk, and to the complete job."""
    spec = JobSpec(TEXT)
    t0 = time.perf_counter()
    client.submit(spec)
    first = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for ev in client.poll(0.5):
            if isinstance(ev, Audio) and ev.job == spec.job and first is None:
                first = time.perf_counter() - t0
            elif isinstance(ev, Completed) and ev.job == spec.job:
                client.forget(spec.job)
                return (first if first is not None else float("nan")), time.perf_counter() - t0
            elif isinstance(ev, (Failed, Rejected)) and ev.job == spec.job:
                raise RuntimeError(f"job failed: {ev}")
    raise TimeoutError("job did not complete")


def wait_until_served(client: Client, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            one_job(client, timeout_s=2)
            return
        except (TimeoutError, RuntimeError):
            continue
    raise RuntimeError("no worker served a job")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "mean": statistics.fmean(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=300, help="measured jobs per transport")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    port = free_tcp_base()
    ipc_dir = Path(tempfile.mkdtemp(prefix="cosy-bench-ipc-", dir="/tmp"))
    tcp_dir = Path(tempfile.mkdtemp(prefix="cosy-bench-tcp-", dir="/tmp"))
    url = f"tcp://127.0.0.1:{port}"
    stacks = {
        "ipc": BenchStack("ipc", ipc_dir, ipc_endpoints(ipc_dir), ["--runtime-dir", str(ipc_dir)]),
        "tcp": BenchStack("tcp", tcp_dir, tcp_endpoints(url, tcp_dir), ["--connect", url]),
    }
    clients: dict[str, Client] = {}
    try:
        stacks["ipc"].start([])
        stacks["tcp"].start(["--bind", url])
        for name, st in stacks.items():
            clients[name] = Client(st.endpoints)
            clients[name].connect(10)
            wait_until_served(clients[name])
            for _ in range(args.warmup):
                one_job(clients[name])
        first: dict[str, list[float]] = {n: [] for n in stacks}
        total: dict[str, list[float]] = {n: [] for n in stacks}
        for _ in range(args.jobs):
            for name in stacks:  # alternate, so drift and noise hit both transports alike
                f, t = one_job(clients[name])
                first[name].append(f)
                total[name].append(t)
    finally:
        for c in clients.values():
            c.close()
        for st in stacks.values():
            st.stop()

    result = {n: {"first_chunk_ms": summary(first[n]), "complete_ms": summary(total[n]), "jobs": args.jobs}
              for n in stacks}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.jobs} jobs each, {TEXT!r} on the tone engine, cpu count {os.cpu_count()}")
    print(f"{'transport':<10}{'first p50':>11}{'p90':>8}{'p99':>8}{'complete p50':>14}{'p90':>8}{'p99':>8}  (ms)")
    for n, r in result.items():
        f, t = r["first_chunk_ms"], r["complete_ms"]
        print(f"{n:<10}{f['p50']:>11.2f}{f['p90']:>8.2f}{f['p99']:>8.2f}{t['p50']:>14.2f}{t['p90']:>8.2f}"
              f"{t['p99']:>8.2f}")
    d = result["tcp"]["first_chunk_ms"]["p50"] - result["ipc"]["first_chunk_ms"]["p50"]
    print(f"tcp - ipc, first chunk p50: {d:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
