"""`cosy bench SUITE`: speed against a floor measured in the same run (see docs/performance.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cosy.cli import exits


def bench(
    suite: str = typer.Argument(..., help="transport, throughput, dispatch, piper, gpu, startup, or all."),
    json_out: bool = typer.Option(False, "--json", help="Also print the result as JSON on standard output."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for SUITE.json and SUITE.png."),
    quick: bool = typer.Option(False, "--quick", help="Fewer jobs: a smoke run, not a measurement."),
) -> None:
    """Measure one suite; print a table with ratios against its floor; save JSON and a plot."""
    import importlib

    from cosy.bench import SUITES
    from cosy.bench.common import write_result

    names = list(SUITES) if suite == "all" else [suite]
    for name in names:
        if name not in SUITES:
            exits.fail(f"unknown suite {name!r}; one of: {', '.join(SUITES)}, all", exits.USAGE)
    for name in names:
        typer.echo(f"== cosy bench {name}", err=True)
        data = importlib.import_module(SUITES[name]).run(out, quick)
        data.setdefault("command", f"cosy bench {name}" + (" --quick" if quick else ""))
        path = write_result(out, name, data)
        typer.echo(f"   -> {path}", err=True)
        if json_out:
            typer.echo(json.dumps(data, indent=2, default=float))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
