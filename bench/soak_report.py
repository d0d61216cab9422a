"""The chaos soak's report (tests/chaos/test_soak.py): ``soak.json`` and the RSS curves as ``soak-rss.png``.

The soak builds the report as a plain dict (faults by kind, jobs by outcome, RSS per process lifetime with
its samples, the violations found) and calls :func:`write_report`, also when its assertions fail, so a
failed run can be studied. To plot a saved report again::

    python -m cosy.bench.soak_report bench/results/soak.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cosy.bench.common import write_result

RESULTS = Path(__file__).resolve().parent / "results"
ROLE_COLORS = {"broker": "tab:red", "worker": "tab:blue", "gateway": "tab:green"}


def write_report(report: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write soak.json (and soak-rss.png when matplotlib is importable; else a note in the JSON)."""
    png = plot_rss(report, out_dir)
    report["plot"] = str(png.name) if png else "skipped: matplotlib is not installed (pip install 'cosy-tts[bench]')"
    return write_result(out_dir, "soak", report)


def plot_rss(report: dict[str, Any], out_dir: Path) -> Path | None:
    """RSS over time, one line per process lifetime (a restarted process is a new line), coloured by role."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labelled: set[str] = set()
    for life in report.get("rss", []):
        samples = life.get("samples") or []
        if not samples:
            continue
        role = life["role"]
        ts, mb = zip(*samples, strict=True)
        ax.plot(ts, mb, color=ROLE_COLORS.get(role, "tab:gray"), linewidth=1,
                label=None if role in labelled else role)
        labelled.add(role)
    for fault in report.get("faults", []):
        if fault.get("kind") == "broker_kill":
            ax.axvline(fault["t_s"], color="tab:red", alpha=0.25, linewidth=0.8)
    ax.set_xlabel("seconds since the soak started (red lines: broker killed)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"cosy soak: RSS per process lifetime (seed {report.get('seed')}, {report.get('soak_s')} s of faults)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path = out_dir / "soak-rss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else RESULTS / "soak.json"
    report = json.loads(path.read_text())
    png = plot_rss(report, path.parent)
    print(png or "matplotlib is not installed: pip install 'cosy-tts[bench]'")
    return 0 if png else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
