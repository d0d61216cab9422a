"""`cosy bench`: reproducible speed measurements, each against a floor measured in the same run.

Benchmarks, not tests: they print ratios and write JSON and a PNG under bench/results/. Each suite is a
module with ``run(out_dir, quick) -> dict``; it starts its own processes and stops them by PID.
"""

from __future__ import annotations

SUITES: dict[str, str] = {
    "transport": "cosy.bench.transport",
    "throughput": "cosy.bench.throughput",
    "dispatch": "cosy.bench.dispatch",
    "piper": "cosy.bench.piper_suite",
    "gpu": "cosy.bench.gpu",
    "startup": "cosy.bench.startup",
}
