"""Reading `cosy batch`'s manifest in tests: every line a whole JSON record, each batch line written once."""

from __future__ import annotations

import json
from pathlib import Path


def manifest_records(outdir: Path, name: str = "manifest.jsonl") -> list[dict]:
    """Every record of the manifest in order (none when there is no manifest yet); a line that is not one
    whole JSON record fails the test."""
    path = outdir / name
    if not path.exists():
        return []
    return [json.loads(raw) for raw in path.read_text().splitlines() if raw.strip()]


def successes(outdir: Path) -> dict[int, dict]:
    """The written lines' records by line number; a line recorded as written twice fails the test."""
    out: dict[int, dict] = {}
    for rec in manifest_records(outdir):
        if "file" in rec:
            assert rec["line"] not in out, f"line {rec['line']} written twice"
            out[rec["line"]] = rec
    return out
