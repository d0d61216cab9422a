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
    device: str = typer.Option("auto", "--device", help="gpu suite: cpu (the generated tiny model), cuda, or auto "
                               "(cuda when a model folder is given)."),
    model_dir: str = typer.Option(None, "--model-dir", help="gpu suite: the CosyVoice model folder (or "
                                  "COSY_MODEL_DIR)."),
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
        module = importlib.import_module(SUITES[name])
        extra = {"device": device, "model_dir": model_dir} if name == "gpu" else {}
        data = module.run(out, quick, **extra)
        flags = (" --quick" if quick else "") + (f" --device {device}" if name == "gpu" and device != "auto" else "")
        data.setdefault("command", f"cosy bench {name}{flags}")
        path = write_result(out, name, data)
        typer.echo(f"   -> {path}", err=True)
        if json_out:
            typer.echo(json.dumps(data, indent=2, default=float))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
