"""`cosy http` and `cosy wyoming`: the gateways, as commands. Heavy imports stay inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer

from cosy.cli import exits
from cosy.endpoints import is_loopback

SplitOpt = typer.Option(True, "--split/--no-split",
                        help="With 2+ workers, synthesize a long input as sentence jobs across them.")
RuntimeDirOpt = typer.Option(None, "--runtime-dir", envvar="COSY_RUNTIME_DIR",
                             help="Folder of the broker's ipc sockets [default: $XDG_RUNTIME_DIR/cosy].")
ConnectOpt = typer.Option(None, "--connect", envvar="COSY_CONNECT",
                          help="tcp://HOST:PORT of a broker (four ports from PORT) instead of ipc.")
CurveOpt = typer.Option(None, "--curve-dir", envvar="COSY_CURVE_DIR",
                        help="CURVE key folder (client.key_secret, server.key) for a tcp broker.")
LogLevelOpt = typer.Option("INFO", "--log-level", envvar="COSY_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR.")
MetricsPortOpt = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics "
                              "(needs the http extra).")
TimeoutOpt = typer.Option(60.0, "--timeout", min=1.0,
                          help="Seconds to wait for a job's first audio, and between two chunks.")


def _endpoints(runtime_dir: Path | None, url: str | None, curve_dir: Path | None = None):
    """The broker's endpoints; with --connect and CURVE keys, the keys are checked before anything starts."""
    from cosy.endpoints import EndpointError, resolve
    from cosy.security import KeyError_, client_keys

    try:
        eps = resolve(runtime_dir, url, curve_dir)
    except EndpointError as exc:
        exits.fail(str(exc), exits.USAGE)
    if eps.secure:
        try:
            client_keys(eps.curve_dir)  # type: ignore[arg-type]
        except KeyError_ as exc:
            exits.fail(str(exc), exits.USAGE)
    return eps


def _pairs(pairs: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            exits.fail(f"{what} takes NAME=VOICE, got {pair!r}", exits.USAGE)
        out[key] = value
    return out


def need_extra(who: str, extra: str, modules: tuple[str, ...]) -> None:
    """Exit with the pip command when an optional extra's modules are missing (looked up, not imported: fast)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        exits.fail(f"{who} needs the '{extra}' extra ({', '.join(missing)} missing): pip install 'cosy-tts[{extra}]'",
                   exits.USAGE)


HTTP_MODULES = ("starlette", "uvicorn", "prometheus_client")


def _need_http_extra() -> None:
    need_extra("the gateways", "http", HTTP_MODULES)


def http(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", "-p", min=1, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="COSY_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' (mandatory off loopback)."),
    timeout: float = TimeoutOpt,
    pcm_rate: str = typer.Option("24000", "--pcm-rate",
                                 help="Sample rate of response_format=pcm: 24000 (OpenAI's) or 'native'."),
    voice_alias: list[str] = typer.Option([], "--voice-alias",
                                          help="NAME=VOICE: answer requests for NAME (e.g. alloy) with VOICE; "
                                          "*=VOICE for every OpenAI name. Adds to the config file's "
                                          "[voice_aliases] (repeatable)."),
    voices_dir: Path | None = typer.Option(None, "--voices-dir", envvar="COSY_VOICES_DIR",
                                           help="Voice registry that POST /v1/audio/voices adds to "
                                           "[default: $XDG_DATA_HOME/cosy/voices]."),
    split: bool = SplitOpt,
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
    curve_dir: Path | None = CurveOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Serve the OpenAI speech API (POST /v1/audio/speech) in front of the broker.

    Examples:\n
      cosy http --port 8000\n
      cosy http --voice-alias alloy=joe --voice-alias '*=joe'\n
      curl -s localhost:8000/v1/audio/speech -d '{"input": "Hello.", "voice": "joe", "response_format": "wav"}' | aplay
    """
    _need_http_extra()
    from cosy import logs
    from cosy.config import voice_aliases
    from cosy.gateways.http import HttpConfig, run_http

    logs.setup(log_level)
    if not is_loopback(host) and not api_key:
        exits.fail(f"refusing to listen on {host} without --api-key (or COSY_API_KEY): anyone who can reach "
                   "it could use your workers", exits.USAGE)
    if pcm_rate != "native" and not (pcm_rate.isdigit() and 8000 <= int(pcm_rate) <= 192_000):
        exits.fail(f"--pcm-rate must be a rate in Hz (8000-192000) or 'native', got {pcm_rate!r}", exits.USAGE)
    config = HttpConfig(host=host, port=port, api_key=api_key or None, timeout_s=timeout,
                        pcm_rate=None if pcm_rate == "native" else int(pcm_rate),
                        voice_aliases={**voice_aliases(), **_pairs(voice_alias, "--voice-alias")}, split=split,
                        voices_dir=voices_dir)
    raise typer.Exit(run_http(_endpoints(runtime_dir, connect, curve_dir), config, log_level))


def wyoming(
    uri: str = typer.Option("tcp://127.0.0.1:10200", "--uri", help="tcp://HOST:PORT or unix://PATH to listen on."),
    language: list[str] = typer.Option([], "--language", "-l",
                                       help="Language tag(s) the voices are announced with [default: en]."),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="Listen on a non-loopback address (Wyoming has no authentication)."),
    timeout: float = TimeoutOpt,
    metrics_port: int | None = MetricsPortOpt,
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
    curve_dir: Path | None = CurveOpt,
    log_level: str = LogLevelOpt,
) -> None:
    """Serve the Wyoming protocol (Home Assistant's local TTS) in front of the broker."""
    _need_http_extra()
    try:
        import wyoming as _wyoming  # noqa: F401
    except ImportError:
        exits.fail("cosy wyoming needs the 'wyoming' package: pip install 'cosy-tts[http]'", exits.USAGE)
    from cosy import logs
    from cosy.gateways.wyoming import WyomingConfig, parse_uri, run_wyoming

    logs.setup(log_level)
    try:
        host, _port = parse_uri(uri)
    except ValueError as exc:
        exits.fail(str(exc), exits.USAGE)
    if host is not None and not is_loopback(host) and not allow_remote:
        exits.fail(f"refusing to listen on {host}: Wyoming has no authentication. Pass --allow-remote to serve "
                   "other hosts (on a network you trust).", exits.USAGE)
    config = WyomingConfig(uri=uri, languages=language or ["en"], timeout_s=timeout, metrics_port=metrics_port)
    raise typer.Exit(run_wyoming(_endpoints(runtime_dir, connect, curve_dir), config))


def register(app: typer.Typer) -> None:
    app.command("http")(http)
    app.command("wyoming")(wyoming)
