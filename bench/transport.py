"""`cosy bench transport`: submit -> first chunk through broker + `tone` worker (no synthesis time), at 1, 16
and 64 streams in flight, against two bare pyzmq floors measured in the same run on ipc sockets:

- floor (the issue's): DEALER -> ROUTER -> PUB -> SUB, one server process that publishes the same chunks;
- relay floor: cosy's own four process hops (client -> broker -> worker -> broker -> client) in bare pyzmq,
  without protocol decoding, scheduling or replay: what the shape costs before any cosy code.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cosy.bench import common as C
from cosy.bench.loop import TEXT, BareLoopClient, CosyLoopClient, closed_loop

STREAMS = (1, 16, 64)
CHUNKS, CHUNK_BYTES = 5, 4410  # what the tone engine makes of TEXT: 5 chunks of 100 ms at 22050 Hz


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    load_before = C.wait_low_load()
    floor = C.Procs("cosy-bf-")
    relay = C.Procs("cosy-br-")
    cosy = C.Procs("cosy-bc-")
    rows: list[dict[str, Any]] = []
    try:
        floor.spawn(["-m", "cosy.bench.floor", "direct", str(floor.dir), str(CHUNKS), str(CHUNK_BYTES)], "direct")
        relay.spawn(["-m", "cosy.bench.floor", "relay", str(relay.dir)], "relay")
        C.wait_for(lambda: (relay.dir / "back.sock").exists(), 10, "the relay floor")
        relay.spawn(["-m", "cosy.bench.floor", "rworker", str(relay.dir), str(CHUNKS), str(CHUNK_BYTES)], "rworker")
        cosy.broker()
        cosy.worker("tone", "bench-tone", {**C.TONE_FAST, "capacity": 64})
        cosy.wait_workers(1)
        C.wait_for(lambda: (floor.dir / "front.sock").exists(), 10, "the direct floor")
        clients = {"floor": BareLoopClient(floor.dir, CHUNKS + 1), "relay": BareLoopClient(relay.dir, CHUNKS + 1),
                   "cosy": CosyLoopClient(cosy.dir)}
        try:
            for c in clients.values():  # warm every path (imports, connections, thread pools)
                closed_loop(c, 4, 40, 20)
            for n in STREAMS:
                jobs = (100 if quick else 400) if n == 1 else (300 if quick else 40 * n)
                res = {name: closed_loop(c, n, jobs, 30, warmup=min(2 * n, 50)) for name, c in clients.items()}
                f, r, k = (C.ms_summary(res[x].ttfc_s) for x in ("floor", "relay", "cosy"))
                rows.append({
                    "streams": n, "jobs": len(res["cosy"].ttfc_s), "failed": res["cosy"].failed,
                    "ttfc_p50_ms": k["p50"], "ttfc_p90_ms": k["p90"], "ttfc_p99_ms": k["p99"],
                    "floor_p50_ms": f["p50"], "floor_p99_ms": f["p99"],
                    "relay_floor_p50_ms": r["p50"], "relay_floor_p99_ms": r["p99"],
                    "ratio_p50": C.ratio(k["p50"], f["p50"]), "ratio_p99": C.ratio(k["p99"], f["p99"]),
                    "ratio_p50_vs_relay": C.ratio(k["p50"], r["p50"]),
                    "done_p50_ms": C.ms_summary(res["cosy"].total_s)["p50"],
                    "jobs_per_s": round(res["cosy"].jobs_per_s, 1),
                    "floor_jobs_per_s": round(res["floor"].jobs_per_s, 1),
                })
        finally:
            for c in clients.values():
                c.close()
    finally:
        for p in (cosy, relay, floor):
            p.stop()
    one = rows[0]
    last = rows[-1]
    data = {
        "suite": "transport", "text": TEXT, "engine": "tone (no delay)", "endpoints": "ipc",
        "streams": rows,
        # The headline keys, at one stream (p99 at the highest concurrency):
        "ttfc_p50_ms": one["ttfc_p50_ms"], "ttfc_p99_ms": last["ttfc_p99_ms"], "floor_p50_ms": one["floor_p50_ms"],
        "ratio_p50": one["ratio_p50"],
        "targets": {
            "p50 <= 2x floor at 1 stream": one["ratio_p50"] <= 2.0,
            "p50 <= 1 ms at 1 stream": one["ttfc_p50_ms"] <= 1.0,
            "p99 <= 5 ms at 64 streams": last["ttfc_p99_ms"] <= 5.0,
        },
        "load_before": load_before, "load_after": os.getloadavg()[0], "machine": C.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    print(C.table(["streams", "cosy p50", "p99", "floor p50", "p99", "ratio p50", "relay p50", "vs relay",
                   "jobs/s"],
                  [[r["streams"], r["ttfc_p50_ms"], r["ttfc_p99_ms"], r["floor_p50_ms"], r["floor_p99_ms"],
                    r["ratio_p50"], r["relay_floor_p50_ms"], r["ratio_p50_vs_relay"], r["jobs_per_s"]]
                   for r in rows]))
    print("  (ms, submit -> first chunk at the client; floor: DEALER->ROUTER->PUB->SUB; relay: cosy's 4 hops, bare)")
    C.bar_plot(out_dir, "transport", "submit -> first chunk, p50 (ipc, tone engine)",
               [f"{r['streams']} streams" for r in rows],
               {"cosy": [r["ttfc_p50_ms"] for r in rows],
                "bare relay (4 hops)": [r["relay_floor_p50_ms"] for r in rows],
                "floor (2 hops)": [r["floor_p50_ms"] for r in rows]}, "ms", log=True)
    return data
