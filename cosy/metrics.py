"""Prometheus metrics for the broker (``cosy broker --metrics-port``) and the gateways (``/metrics``).

Names (all prefixed ``cosy_``):

  broker, and mirrored by the gateways from the broker's status:
    queue_depth{priority}                      gauge    jobs waiting, by priority class
    workers                                    gauge    connected workers
    worker_capacity{worker}                    gauge    jobs a worker runs at once
    worker_running{worker}                     gauge    jobs a worker runs now
    worker_gpu_memory_used_bytes{worker}       gauge    from NVML, in the worker's heartbeats
    worker_gpu_utilization_ratio{worker}       gauge    0-1
    worker_gpu_temperature_celsius{worker}     gauge
    worker_gpu_power_watts{worker}             gauge
    jobs_total{outcome}                        counter  done, failed, rejected, cancelled
    job_retries_total                          counter  attempts requeued after a worker was lost
  broker only:
    ttfc_seconds                               histogram  job start to first audio chunk
    rtf                                        histogram  real-time factor (synthesis time / audio time)
  gateway only (its own jobs and requests):
    gateway_ttfc_seconds, gateway_rtf          histograms, as the workers reported them
    gateway_time_to_first_byte_seconds{api}    histogram  request received to first audio byte sent
    gateway_requests_total{api,status}         counter
    gateway_active_streams{api}                gauge
    gateway_audio_seconds_total{api}           counter    audio delivered
    gateway_client_disconnects_total{api}      counter    streams cut by the client (job cancelled)
    broker_up                                  gauge    1 while the broker answers
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFC_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
TTFB_BUCKETS = TTFC_BUCKETS + (20.0, 30.0, 60.0)
OUTCOMES = ("done", "failed", "rejected", "cancelled")


@dataclass(frozen=True)
class GpuGauge:
    key: str  # in a worker's heartbeat metrics
    name: str
    help: str
    scale: float


GPU_GAUGES = (
    GpuGauge("gpu_mem_used_mb", "cosy_worker_gpu_memory_used_bytes", "GPU memory in use (NVML)", 1024 * 1024),
    GpuGauge("gpu_util_pct", "cosy_worker_gpu_utilization_ratio", "GPU utilisation, 0-1 (NVML)", 0.01),
    GpuGauge("gpu_temp_c", "cosy_worker_gpu_temperature_celsius", "GPU temperature (NVML)", 1.0),
    GpuGauge("gpu_power_w", "cosy_worker_gpu_power_watts", "GPU power draw (NVML)", 1.0),
)


def serve(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> Any:
    """Serve ``registry`` at http://addr:port/metrics from a daemon thread; returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class BrokerMetrics:
    """What the broker updates. Cheap calls; safe from the broker's loop thread.

    Wiring (broker/server.py): observe_done() on each DONE, count() on each outcome,
    retried() on each requeue, update_queue() and update_workers() once per loop tick or
    heartbeat, serve(port) at start.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("cosy_queue_depth", "Jobs waiting, by priority class", ["priority"], registry=r)
        self.workers = Gauge("cosy_workers", "Connected workers", registry=r)
        self.jobs = Counter("cosy_jobs", "Jobs by outcome", ["outcome"], registry=r)
        self.retries = Counter("cosy_job_retries", "Attempts requeued after a worker was lost", registry=r)
        self.ttfc = Histogram("cosy_ttfc_seconds", "Job start to first audio chunk", buckets=TTFC_BUCKETS,
                              registry=r)
        self.rtf = Histogram("cosy_rtf", "Real-time factor: synthesis time / audio duration", buckets=RTF_BUCKETS,
                             registry=r)
        self.capacity = Gauge("cosy_worker_capacity", "Jobs a worker runs at once", ["worker"], registry=r)
        self.running = Gauge("cosy_worker_running", "Jobs a worker runs now", ["worker"], registry=r)
        self.gpu = {g.key: Gauge(g.name, g.help, ["worker"], registry=r) for g in GPU_GAUGES}
        for outcome in OUTCOMES:
            self.jobs.labels(outcome)
        for priority in ("interactive", "bulk"):
            self.queue_depth.labels(priority)
        self._worker_names: set[str] = set()
        self._lock = threading.Lock()
        self._server: Any = None

    def observe_done(self, ttfc_ms: float, rtf: float) -> None:
        """A job finished: its time to first chunk (ms) and real-time factor."""
        if ttfc_ms > 0:
            self.ttfc.observe(ttfc_ms / 1000)
        if rtf > 0:
            self.rtf.observe(rtf)
        self.jobs.labels("done").inc()

    def count(self, outcome: str) -> None:
        """One job ended as ``failed``, ``rejected`` or ``cancelled`` (``done`` goes through observe_done)."""
        self.jobs.labels(outcome).inc()

    def retried(self) -> None:
        self.retries.inc()

    def update_queue(self, interactive: int, bulk: int, workers: int) -> None:
        self.queue_depth.labels("interactive").set(interactive)
        self.queue_depth.labels("bulk").set(bulk)
        self.workers.set(workers)

    def update_workers(self, workers: Iterable[Mapping[str, Any]]) -> None:
        """Per-worker gauges from the broker's status entries (name, capacity, running, metrics).

        Workers that left lose their series.
        """
        with self._lock:
            seen: set[str] = set()
            for w in workers:
                name = str(w.get("name", ""))
                if not name:
                    continue
                seen.add(name)
                self.capacity.labels(name).set(float(w.get("capacity", 0)))
                self.running.labels(name).set(float(w.get("running", 0)))
                metrics = w.get("metrics") or {}
                for g in GPU_GAUGES:
                    value = _as_float(metrics.get(g.key))
                    if value is not None:
                        self.gpu[g.key].labels(name).set(value * g.scale)
            for gone in self._worker_names - seen:
                for gauge in (self.capacity, self.running, *self.gpu.values()):
                    try:
                        gauge.remove(gone)
                    except KeyError:
                        pass
            self._worker_names = seen

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        self._server = serve(self.registry, port, addr)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class BrokerStatusCollector(Collector):
    """The broker's figures, read at scrape time from its latest STATUS reply (for a gateway's /metrics).

    ``source`` returns (latest status or None, whether the broker answers now). While the broker
    does not answer, only ``cosy_broker_up 0`` is reported: no stale figures.
    """

    def __init__(self, source: Callable[[], tuple[dict[str, Any] | None, bool]] | None = None) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        st, is_up = self.source() if self.source is not None else (None, False)
        up = GaugeMetricFamily("cosy_broker_up", "1 while the broker answers the gateway")
        up.add_metric([], 1.0 if is_up else 0.0)
        yield up
        if not st or not is_up:
            return
        queue = GaugeMetricFamily("cosy_queue_depth", "Jobs waiting, by priority class", labels=["priority"])
        for priority in ("interactive", "bulk"):
            queue.add_metric([priority], float(st.get("queue", {}).get(priority, 0)))
        yield queue
        workers = st.get("workers", [])
        count = GaugeMetricFamily("cosy_workers", "Connected workers")
        count.add_metric([], float(len(workers)))
        yield count
        counters = st.get("counters", {})
        jobs = CounterMetricFamily("cosy_jobs", "Jobs by outcome", labels=["outcome"])
        for outcome in OUTCOMES:
            jobs.add_metric([outcome], float(counters.get(outcome, 0)))
        yield jobs
        retries = CounterMetricFamily("cosy_job_retries", "Attempts requeued after a worker was lost")
        retries.add_metric([], float(counters.get("retried", 0)))
        yield retries
        yield from _worker_families(workers)


def _worker_families(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    capacity = GaugeMetricFamily("cosy_worker_capacity", "Jobs a worker runs at once", labels=["worker"])
    running = GaugeMetricFamily("cosy_worker_running", "Jobs a worker runs now", labels=["worker"])
    gpu = {g.key: GaugeMetricFamily(g.name, g.help, labels=["worker"]) for g in GPU_GAUGES}
    for w in workers:
        name = str(w.get("name", ""))
        capacity.add_metric([name], float(w.get("capacity", 0)))
        running.add_metric([name], float(w.get("running", 0)))
        metrics = w.get("metrics") or {}
        for g in GPU_GAUGES:
            value = _as_float(metrics.get(g.key))
            if value is not None:
                gpu[g.key].add_metric([name], value * g.scale)
    yield capacity
    yield running
    yield from gpu.values()


class GatewayMetrics:
    """The gateway's own figures plus the broker's (through BrokerStatusCollector)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("cosy_gateway_requests", "Speech requests by API and HTTP-like status",
                                ["api", "status"], registry=r)
        self.ttfb = Histogram("cosy_gateway_time_to_first_byte_seconds", "Request received to first audio byte",
                              ["api"], buckets=TTFB_BUCKETS, registry=r)
        self.ttfc = Histogram("cosy_gateway_ttfc_seconds", "Job start to first chunk, as the worker reported it",
                              buckets=TTFC_BUCKETS, registry=r)
        self.rtf = Histogram("cosy_gateway_rtf", "Real-time factor of the gateway's jobs", buckets=RTF_BUCKETS,
                             registry=r)
        self.active = Gauge("cosy_gateway_active_streams", "Audio streams being sent", ["api"], registry=r)
        self.audio_seconds = Counter("cosy_gateway_audio_seconds", "Audio delivered", ["api"], registry=r)
        self.disconnects = Counter("cosy_gateway_client_disconnects", "Streams cut short by the client",
                                   ["api"], registry=r)
        self.broker = BrokerStatusCollector()
        r.register(self.broker)

    def job_done(self, ttfc_ms: float, rtf: float) -> None:
        if ttfc_ms > 0:
            self.ttfc.observe(ttfc_ms / 1000)
        if rtf > 0:
            self.rtf.observe(rtf)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
