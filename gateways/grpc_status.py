"""cosy.Status/Get's reply (gateways/proto/cosy_status.proto) from the broker's status.

Apart from :mod:`cosy.gateways.grpc` so that it imports only the ``cosy`` package's messages: a process that holds
the official runtime's ``cosyvoice`` stubs (a client, the tests) can use it too.
"""

from __future__ import annotations

from typing import Any

from cosy import protocol as P
from cosy.gateways.proto import cosy_status_pb2 as spb
from cosy.gpu import NO_GPU

# Gpu field <- the worker heartbeat's key (PROTOCOL.md, HEARTBEAT; cosy.gpu.GpuMonitor)
GPU_FIELDS = (("memory_used_mb", "gpu_mem_used_mb"), ("memory_total_mb", "gpu_mem_total_mb"),
              ("utilization_pct", "gpu_util_pct"), ("temperature_c", "gpu_temp_c"), ("power_w", "gpu_power_w"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def status_reply(status: dict[str, Any], broker_up: bool) -> spb.StatusReply:
    """cosy.Status/Get's reply from the broker's STATUS_REPLY body (PROTOCOL.md)."""
    queue = status.get("queue") or {}
    reply = spb.StatusReply(
        broker_up=broker_up, broker_version=str((status.get("broker") or {}).get("version", "")),
        queue=spb.Queue(interactive=int(queue.get(P.INTERACTIVE, 0)), bulk=int(queue.get(P.BULK, 0)),
                        running=int(status.get("running", 0))),
        voices=[str(v) for v in status.get("voices", [])])
    for w in status.get("workers", []):
        worker = reply.workers.add(
            name=str(w.get("name", "")), engine=str(w.get("engine", "")), model=str(w.get("model", "")),
            device=str(w.get("device", "")), host=str(w.get("host", "")),
            voices=[str(v) for v in w.get("voices", [])], default_voice=str(w.get("default_voice") or ""),
            sample_rate=int(w.get("sample_rate") or 0), capacity=int(w.get("capacity") or 0),
            running=int(w.get("running") or 0), state=str(w.get("state", "")), clone=bool(w.get("clone")),
            jobs_done=int(w.get("jobs_done") or 0), jobs_failed=int(w.get("jobs_failed") or 0))
        metrics = w.get("metrics") or {}
        if "gpu_mem_used_mb" not in metrics and "gpu_name" not in metrics:
            worker.no_gpu = NO_GPU
            continue
        gpu = spb.Gpu(name=str(metrics.get("gpu_name", "")))
        for field_name, key in GPU_FIELDS:
            value = _number(metrics.get(key))
            if value is not None:
                setattr(gpu, field_name, value)
        worker.gpu.CopyFrom(gpu)
    return reply
