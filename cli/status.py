"""`cosy status`: the broker, its queue and its workers, as a table or JSON."""

from __future__ import annotations

import json
import time
from typing import Any

import zmq

from cosy import protocol as P
from cosy.cli import exits
from cosy.endpoints import Endpoints


def fetch_status(eps: Endpoints, timeout_s: float = 3.0) -> dict[str, Any]:
    """Ask the broker for its status; exit 3 with a one-line message when it does not answer."""
    import os

    if not eps.is_tcp and not os.path.exists(eps.front[len("ipc://"):]):
        exits.fail(f"no broker at {eps.front} (is `cosy up` or cosy-broker running?)", exits.UNREACHABLE)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    from cosy.security import prepare_client

    prepare_client(sock, eps.curve_dir if eps.secure else None)
    sock.connect(eps.front)
    try:
        sock.send_multipart(P.StatusRequest().to_frames())
        if not sock.poll(timeout_s * 1000):
            exits.fail(f"the broker at {eps.front} did not answer within {timeout_s:g} s", exits.UNREACHABLE)
        msg = P.decode(sock.recv_multipart(), P.BROKER_TO_CLIENT)
        if not isinstance(msg, P.StatusReply):
            exits.fail("unexpected answer from the broker", exits.UNREACHABLE)
        return msg.status
    finally:
        sock.close(linger=0)


def render(st: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    from cosy.gpu import describe

    b = st["broker"]
    head = Table.grid(padding=(0, 2))
    head.add_row("broker", f"pid {b['pid']}", f"up {_duration(b['uptime_s'])}", f"v{b['version']}",
                 b["endpoints"]["front"])
    q = st["queue"]
    head.add_row("queue", f"interactive {q.get('interactive', 0)}", f"bulk {q.get('bulk', 0)}",
                 f"running {st['running']}", "")
    c = st["counters"]
    head.add_row("jobs", f"done {c['done']}", f"failed {c['failed']}", f"retried {c['retried']}",
                 f"rejected {c['rejected']}")
    table = Table(title=f"{len(st['workers'])} worker(s)", expand=False)
    for col in ("worker", "pid", "engine", "model", "device", "state", "jobs", "ttfc ms", "rtf", "gpu"):
        table.add_column(col)
    for w in st["workers"]:
        m = w.get("metrics", {})
        gpu = describe(m)
        table.add_row(w["name"], str(w["pid"]), w["engine"], w["model"], w["device"],
                      f"{w['state']} {w['running']}/{w['capacity']}{_capacity_note(m)}", str(w["jobs_done"]),
                      f"{m.get('mean_ttfc_ms', 0):.0f}", f"{m.get('mean_rtf', 0):.3f}", gpu)
    return Group(head, table)


CAPACITY_NOTES = {"warm-up": "measured", "bench": "bench", "option": "set"}


def _capacity_note(metrics: dict[str, Any]) -> str:
    """Where a worker's capacity came from, for engines that say (CosyVoice: measured at warm-up, a `cosy bench
    gpu` sweep, or the capacity option)."""
    note = CAPACITY_NOTES.get(str(metrics.get("capacity_source", "")))
    return f" ({note})" if note else ""


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_status(eps: Endpoints, json_out: bool, watch: float | None) -> int:
    if json_out:
        print(json.dumps(fetch_status(eps), indent=2))
        return exits.OK
    from rich.console import Console

    console = Console()
    if not watch:
        console.print(render(fetch_status(eps)))
        return exits.OK
    from rich.live import Live

    with Live(render(fetch_status(eps)), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(watch)
            live.update(render(fetch_status(eps)))
