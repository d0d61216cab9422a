"""`cosy bench startup`: how long the CLI takes to start, and which imports it spends that on.

- `cosy --help` wall time (median of runs), against `python -c pass` (the interpreter's floor) in the same run;
- `python -X importtime -m cosy --help`: the top modules by cumulative import time;
- `cosy say` time to first audio with a `tone` worker (no synthesis time): the CLI's own start-to-audio cost.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cosy.bench import common as C
from cosy.bench.piper_suite import _cosy_cmd, say_first_audio


def _wall(cmd: list[str], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
        out.append(time.perf_counter() - t0)
    return out


def import_offenders(args: list[str], top: int = 15) -> tuple[list[dict[str, Any]], float]:
    """Top-level packages by cumulative import time (ms), and the total, from -X importtime."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cosy", *args], capture_output=True,
                          text=True, timeout=60)
    rows = []
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m.group(2)) / 1000, len(m.group(3)) // 2, m.group(4)))
    total = sum(ms for ms, depth, _ in rows if depth == 0)
    # depth 0 entries are what the entry point imported itself (with their whole subtree)
    tops = sorted((r for r in rows if r[1] <= 1), key=lambda r: -r[0])[:top]
    return [{"module": name, "cumulative_ms": round(ms, 1), "depth": depth} for ms, depth, name in tops], total


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    load_before = C.wait_low_load()
    reps = 5 if quick else 15
    _wall([*_cosy_cmd(), "--help"], 2)  # warm the page cache and pyc files
    floor = _wall([sys.executable, "-c", "pass"], reps)
    help_t = _wall([*_cosy_cmd(), "--help"], reps)
    help_t2 = _wall([sys.executable, "-m", "cosy", "--help"], reps)
    offenders, total_ms = import_offenders(["--help"])
    say_offenders, say_total = import_offenders(["say", "--help"])
    procs = C.Procs("cosy-bs-")
    try:
        procs.broker()
        procs.worker("tone", "bench-tone", C.TONE_FAST)
        procs.wait_workers(1)
        say_first_audio(procs.dir, "Warm up.")
        say = [say_first_audio(procs.dir, "Hello there, general.") for _ in range(reps)]
    finally:
        procs.stop()
    med = statistics.median
    data = {
        "suite": "startup",
        "help_ms": round(med(help_t) * 1000, 1), "help_python_m_ms": round(med(help_t2) * 1000, 1),
        "python_floor_ms": round(med(floor) * 1000, 1), "ratio_help": C.ratio(med(help_t), med(floor)),
        "import_total_ms": round(total_ms, 1), "import_offenders": offenders,
        "say_help_import_total_ms": round(say_total, 1),
        "say_tone_first_audio_ms": round(med(say) * 1000, 1),
        "targets": {"cosy --help <= 150 ms": med(help_t) <= 0.150},
        "load_before": load_before, "load_after": os.getloadavg()[0], "machine": C.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    print(C.table(["measure", "ms", "floor (python -c pass)", "ratio"],
                  [["cosy --help", data["help_ms"], data["python_floor_ms"], data["ratio_help"]],
                   ["python -m cosy --help", data["help_python_m_ms"], data["python_floor_ms"],
                    C.ratio(med(help_t2), med(floor))],
                   ["cosy say first audio (tone)", data["say_tone_first_audio_ms"], data["python_floor_ms"],
                    C.ratio(med(say), med(floor))]]))
    print(f"  imports under `cosy --help`: {total_ms:.0f} ms; top offenders (cumulative):")
    for o in offenders[:10]:
        print(f"    {o['cumulative_ms']:8.1f} ms  {'  ' * o['depth']}{o['module']}")
    C.bar_plot(out_dir, "startup", "CLI start (median wall time)", ["--help", "say -> first audio (tone)"],
               {"cosy": [data["help_ms"], data["say_tone_first_audio_ms"]],
                "python -c pass": [data["python_floor_ms"], data["python_floor_ms"]]}, "ms")
    return data
