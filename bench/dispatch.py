"""`cosy bench dispatch`: tiny jobs per second through the broker, submit -> DONE (and the audio), with a
window of jobs in flight, against the bare four-hop relay (`floor relay` + `floor rworker`) in the same run.

A tiny job is one character of tone: one 20 ms chunk plus the final chunk.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cosy.bench import common as C
from cosy.bench.loop import BareLoopClient, CosyLoopClient, closed_loop

WINDOW = 128


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    load_before = C.wait_low_load()
    jobs = 1000 if quick else 4000
    rows = []
    relay = C.Procs("cosy-bdr-")
    try:
        relay.spawn(["-m", "cosy.bench.floor", "relay", str(relay.dir)], "relay")
        C.wait_for(lambda: (relay.dir / "back.sock").exists(), 10, "the relay floor")
        relay.spawn(["-m", "cosy.bench.floor", "rworker", str(relay.dir), "1", "882"], "rworker")
        floor_client = BareLoopClient(relay.dir, 2)  # 1 chunk + the final one
        try:
            closed_loop(floor_client, 8, 200, 20)
            for workers in (1, 2):
                cosy = C.Procs("cosy-bd-")
                try:
                    cosy.broker()
                    for i in range(workers):
                        cosy.worker("tone", f"bench-tone-{i}", {**C.TONE_FAST, "capacity": 64})
                    cosy.wait_workers(workers)
                    client = CosyLoopClient(cosy.dir, text="a")
                    try:
                        closed_loop(client, 8, 200, 20)
                        pids = {"broker": [cosy.procs[0].pid], "workers": [p.pid for p in cosy.procs[1:]]}
                        cpu0 = {k: sum(C.cpu_seconds(p) for p in v) for k, v in pids.items()}
                        cpu0["client"] = C.cpu_seconds()
                        res = closed_loop(client, WINDOW, jobs, 60, warmup=WINDOW)
                        cpu1 = {k: sum(C.cpu_seconds(p) for p in v) for k, v in pids.items()}
                        cpu1["client"] = C.cpu_seconds()
                        n = max(1, len(res.total_s) + WINDOW)
                        cpu_us = {k: round((cpu1[k] - cpu0[k]) / n * 1e6) for k in cpu0}
                    finally:
                        client.close()
                finally:
                    cosy.stop()
                floor = closed_loop(floor_client, WINDOW, jobs, 60, warmup=WINDOW)
                rows.append({"workers": workers, "window": WINDOW, "jobs": len(res.total_s), "failed": res.failed,
                             "jobs_per_s": round(res.jobs_per_s), "floor_jobs_per_s": round(floor.jobs_per_s),
                             "ratio": C.ratio(res.jobs_per_s, floor.jobs_per_s),
                             "done_p50_ms": C.ms_summary(res.total_s)["p50"], "cpu_us_per_job": cpu_us})
        finally:
            floor_client.close()
    finally:
        relay.stop()
    best = max(r["jobs_per_s"] for r in rows)
    data = {
        "suite": "dispatch", "job": "1 character of tone: 1 chunk + final", "endpoints": "ipc", "rows": rows,
        "jobs_per_s": best, "floor_jobs_per_s": max(r["floor_jobs_per_s"] for r in rows),
        "ratio": C.ratio(best, max(r["floor_jobs_per_s"] for r in rows)),
        "targets": {"dispatch >= 2000 jobs/s": best >= 2000},
        "load_before": load_before, "load_after": os.getloadavg()[0], "machine": C.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    print(C.table(["workers", "window", "cosy jobs/s", "bare relay jobs/s", "ratio", "done p50 ms",
                   "CPU us/job broker", "workers", "client"],
                  [[r["workers"], r["window"], r["jobs_per_s"], r["floor_jobs_per_s"], r["ratio"], r["done_p50_ms"],
                    r["cpu_us_per_job"]["broker"], r["cpu_us_per_job"]["workers"], r["cpu_us_per_job"]["client"]]
                   for r in rows]))
    C.bar_plot(out_dir, "dispatch", "tiny jobs per second, submit -> done (ipc)",
               [f"{r['workers']} worker(s)" for r in rows],
               {"cosy": [r["jobs_per_s"] for r in rows], "bare 4-hop relay": [r["floor_jobs_per_s"] for r in rows]},
               "jobs/s")
    return data
