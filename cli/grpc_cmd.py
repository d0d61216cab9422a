"""`cosy grpc`: the official CosyVoice runtime's gRPC service, as a command. grpc is imported only when it runs."""

from __future__ import annotations

from pathlib import Path

import typer

from cosy.cli import exits
from cosy.cli.gateway_cmds import (
    ConnectOpt,
    CurveOpt,
    LogLevelOpt,
    MetricsPortOpt,
    RuntimeDirOpt,
    SplitOpt,
    TimeoutOpt,
    _endpoints,
    need_extra,
)
from cosy.endpoints import is_loopback

NEEDS = ("grpc", "google.protobuf", "grpc_health")


def grpc(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(50051, "--port", "-p", min=1, max=65535, help="TCP port (the official runtime's "
                             "default is 50000)."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="COSY_API_KEY",
                                       help="Require the metadata 'authorization: Bearer KEY' (the health service "
                                       "stays open). Off loopback: this, or --allow-remote."),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="Listen on a non-loopback address without --api-key (the official "
                                      "clients send no key): only on a network you trust."),
    timeout: float = TimeoutOpt,
    split: bool = SplitOpt,
    metrics_port: int | None = MetricsPortOpt,
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
    curve_dir: Path | None = CurveOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Serve the official CosyVoice gRPC service (cosyvoice.CosyVoice/Inference), grpc.health.v1 and cosy.Status.

    Examples:\n
      cosy grpc\n
      grpc_health_probe -addr 127.0.0.1:50051\n
      python runtime/python/grpc/client.py --port 50051 --mode sft --spk_id joe --tts_text "Hello."
    """
    need_extra("cosy grpc", "grpc", NEEDS)
    if not is_loopback(host) and not api_key and not allow_remote:
        exits.fail(f"refusing to listen on {host} without --api-key (or COSY_API_KEY): anyone who can reach it "
                   "could use your workers. Pass --allow-remote to serve other hosts without a key (on a network "
                   "you trust).", exits.USAGE)
    if metrics_port is not None:
        need_extra("--metrics-port", "http", ("prometheus_client",))
    from cosy import logs
    from cosy.gateways.grpc import GrpcConfig, ListenError, run_grpc

    logs.setup(log_level)
    endpoints = _endpoints(runtime_dir, connect, curve_dir)  # CURVE keys checked before anything starts
    config = GrpcConfig(host=host, port=port, api_key=api_key or None, timeout_s=timeout, split=split,
                        metrics_port=metrics_port)
    try:
        code = run_grpc(endpoints, config)
    except ListenError as exc:
        exits.fail(str(exc), exits.JOB_FAILED)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("grpc")(grpc)
