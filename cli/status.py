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


UNKNOWN = "\u2013"  # en dash: a figure not known yet (no job finished), never a misleading 0

# The worker table's columns, most important first: at a narrow width the last ones are dropped whole
# (never a name cut to "pipe\u2026"). The essential ones always stay.
ESSENTIAL = ("worker", "state", "jobs", "ttfc ms", "rtf")
BY_IMPORTANCE = ("worker", "state", "jobs", "ttfc ms", "rtf", "engine", "gpu", "device", "model", "pid")
ORDER = ("worker", "pid", "engine", "model", "device", "state", "jobs", "ttfc ms", "rtf", "gpu")


def _figure(metrics: dict[str, Any], key: str, fmt: str) -> str:
    value = metrics.get(key)
    if value is None or not metrics.get("jobs_done"):
        return UNKNOWN
    return format(float(value), fmt)


def worker_rows(st: dict[str, Any]) -> list[dict[str, str]]:
    from cosy.gpu import describe

    rows = []
    for w in st["workers"]:
        m = w.get("metrics", {})
        rows.append({"worker": w["name"], "pid": str(w["pid"]), "engine": w["engine"], "model": w["model"],
                     "device": w["device"],
                     "state": f"{w['state']} {w['running']}/{w['capacity']}{_capacity_note(m)}",
                     "jobs": str(w["jobs_done"]), "ttfc ms": _figure(m, "mean_ttfc_ms", ".0f"),
                     "rtf": _figure(m, "mean_rtf", ".3f"), "gpu": describe(m)})
    return rows


def fit_columns(rows: list[dict[str, str]], width: int) -> list[str]:
    """The columns that fit in ``width`` (a bordered table: 3 characters a column plus one), in table order."""
    def need(col: str) -> int:
        return max([len(col), *(len(r[col]) for r in rows)]) + 3

    chosen: list[str] = []
    used = 1
    for col in BY_IMPORTANCE:
        if col in ESSENTIAL or used + need(col) <= width:
            chosen.append(col)
            used += need(col)
    return [c for c in ORDER if c in chosen]


def render(st: dict[str, Any], width: int = 80) -> Any:
    from rich.console import Group
    from rich.table import Table

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
    rows = worker_rows(st)
    cols = fit_columns(rows, width)
    hidden = [c for c in ORDER if c not in cols]
    caption = f"not shown at this width: {', '.join(hidden)} (cosy status --json has all)" if hidden else None
    table = Table(title=f"{len(st['workers'])} worker(s)", expand=False, caption=caption)
    for col in cols:
        table.add_column(col, no_wrap=col != "worker", overflow="fold",
                         justify="right" if col in ("jobs", "ttfc ms", "rtf", "pid") else "left")
    for row in rows:
        table.add_row(*(row[c] for c in cols))
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
        console.print(render(fetch_status(eps), console.width))
        return exits.OK
    from rich.live import Live

    # In place: one screen redrawn every `watch` seconds (the alternate screen keeps the scrollback clean),
    # until Ctrl-C.
    try:
        with Live(render(fetch_status(eps), console.width), console=console, auto_refresh=False,
                  screen=console.is_terminal) as live:
            while True:
                time.sleep(watch)
                live.update(render(fetch_status(eps), console.width), refresh=True)
    except KeyboardInterrupt:
        return exits.OK
