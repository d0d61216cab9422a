"""`cosy status` in a real terminal width, and `cosy up` with a worker that cannot start.

The status tests run a real broker and `tone` workers (speech content does not matter here) and read
`cosy status` as a user would, at COLUMNS=80. The `cosy up` test starts the real supervisor with a
configuration that no worker can start with.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from stack import Stack

from cosy.client import Client, Completed, JobSpec
from cosy.polling import wait_for

LONG_NAMES = ("living-room-speaker-0", "workstation-tone-gpu-1")
TONE = {"delay_ms": 5, "chunk_ms": 50, "ms_per_char": 2, "capacity": 1}


def run_one_job(stack: Stack, worker_hint: str = "") -> Completed:
    with Client(stack.endpoints) as client:
        client.connect()
        spec = JobSpec(text=f"A job for the status table {worker_hint}.")
        client.submit(spec)
        done = wait_for(lambda: next((e for e in client.poll(0.05) if isinstance(e, Completed)), None), 30,
                        "the job to complete")
    return done


def status_table(stack: Stack, columns: int) -> str:
    env = {**stack.env, "COLUMNS": str(columns), "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "cosy", "status", "--runtime-dir", str(stack.runtime_dir)],
                          env=env, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc.stdout.decode()


def row_of(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if name in line)
    return [cell.strip() for cell in re.split(r"[│┃|]", line) if cell.strip()]


def test_status_fits_80_columns_with_full_names_and_no_zero_figures(stack: Stack) -> None:
    for name in LONG_NAMES:
        stack.start_worker("tone", name=name, options=TONE)
    done = run_one_job(stack)
    busy = done.done.worker
    idle = next(n for n in LONG_NAMES if n != busy)
    table = status_table(stack, 80)
    assert all(len(line) <= 80 for line in table.splitlines()), table
    assert "\u2026" not in table and "..." not in table, f"something was truncated:\n{table}"
    for name in LONG_NAMES:
        assert name in table, f"{name} is not shown in full:\n{table}"
    header = row_of(table, "ttfc")
    for col in ("state", "jobs", "ttfc ms", "rtf"):
        assert col in " ".join(header), f"{col} was dropped at 80 columns:\n{table}"
    cells = dict(zip(header, row_of(table, busy), strict=False))
    assert cells["jobs"] == "1", table
    # Figures as soon as the job is done (not at the next heartbeat), never a misleading 0.
    assert cells["ttfc ms"] not in ("0", "\u2013") and float(cells["ttfc ms"]) > 0, table
    assert cells["rtf"] not in ("0.000", "\u2013") and float(cells["rtf"]) > 0, table
    idle_cells = dict(zip(header, row_of(table, idle), strict=False))
    assert idle_cells["ttfc ms"] == "\u2013" and idle_cells["rtf"] == "\u2013", table
    wide = status_table(stack, 200)
    assert "pid" in wide and "engine" in wide and "not shown" not in wide, wide


def test_up_with_a_worker_that_cannot_start_stops_and_says_so_once(tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    proc = subprocess.run([sys.executable, "-m", "cosy", "up", "--engine", "tone", "--workers", "3",
                           "--option", "no_such_option=1", "--runtime-dir", str(rd), "--log-level", "WARNING"],
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert err.count("cannot start the tone engine") == 1, err
    assert "no_such_option" in err and "not restarted" in err, err
    assert "restarting" not in err and "keeps crashing" not in err, err
    pid = int(re.search(r"broker pid (\d+)", err).group(1))
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
