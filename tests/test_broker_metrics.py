"""`cosy broker --metrics-port`: the broker's own Prometheus figures, read with the Prometheus parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from stack import Stack, wait_for

from cosy.client import Client, Completed, JobSpec
from cosy.endpoints import free_tcp_base


def scrape(port: int) -> dict[str, dict]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_broker_exports_queue_outcomes_and_latency_histograms(bare_stack: Stack) -> None:
    port = free_tcp_base(n=1)
    bare_stack.start_broker("--metrics-port", str(port))
    bare_stack.start_worker("tone", name="t")
    with Client(bare_stack.endpoints) as client:
        client.connect()
        client.submit(JobSpec("measure me"))
        wait_for(lambda: any(isinstance(e, Completed) for e in client.poll(0.05)), 30, "the job")
    m = wait_for(lambda: (lambda m: m if m.get("cosy_workers", {}).get((), 0) == 1 else None)(scrape(port)),
                 10, "a heartbeat to update the gauges")
    assert m["cosy_jobs_total"][(("outcome", "done"),)] == 1
    assert m["cosy_ttfc_seconds_count"][()] == 1
    assert m["cosy_rtf_count"][()] == 1
    assert m["cosy_queue_depth"][(("priority", "bulk"),)] == 0
    assert m["cosy_worker_capacity"][(("worker", "t"),)] == 4
