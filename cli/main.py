"""The `cosy` command. Each command imports what it needs when it runs, so `cosy --help` stays fast.

Exit codes: 0 ok; 1 a job failed; 2 usage or input rejected; 3 broker unreachable;
4 broker busy or timed out; 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from cosy.cli import exits

app = typer.Typer(
    name="cosy",
    help="Self-hosted streaming text-to-speech: a ZeroMQ broker, warm workers, CosyVoice and Piper.",
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    # Plain help: rendering it with rich imports typer.rich_utils, rich.markdown and markdown_it
    # (~80 ms of every `cosy --help`); measured 190 -> 110 ms.
    rich_markup_mode=None,
)

RuntimeDirOpt = typer.Option(None, "--runtime-dir", envvar="COSY_RUNTIME_DIR",
                             help="Folder of the broker's ipc sockets [default: $XDG_RUNTIME_DIR/cosy].")
ConnectOpt = typer.Option(None, "--connect", envvar="COSY_CONNECT",
                          help="tcp://HOST:PORT of a broker (four ports from PORT) instead of ipc.")
CurveOpt = typer.Option(None, "--curve-dir", envvar="COSY_CURVE_DIR",
                        help="CURVE key folder for tcp endpoints (see `cosy keys generate`).")
ModelDirOpt = typer.Option(None, "--model-dir", envvar="COSY_MODEL_DIR",
                           help="Model folder for the cosyvoice engine (same as --option model_dir=...).")
LogLevelOpt = typer.Option("INFO", "--log-level", envvar="COSY_LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR.")


def _endpoints(runtime_dir: Path | None, url: str | None, curve_dir: Path | None = None):
    from cosy.cli.quick import endpoints_or_fail

    return endpoints_or_fail(runtime_dir, url, curve_dir)


def _options(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            exits.fail(f"--option takes key=value, got {pair!r}", exits.USAGE)
        out[key.replace("-", "_")] = value
    return out


def _engine_options(engine: str, pairs: list[str], model_dir: Path | None) -> dict[str, str]:
    options = _options(pairs)
    if model_dir is not None and engine == "cosyvoice":
        options.setdefault("model_dir", str(model_dir.expanduser().absolute()))
    return options


@app.command()
def broker(
    runtime_dir: Path | None = RuntimeDirOpt,
    bind: str | None = typer.Option(None, "--bind", help="tcp://HOST:PORT to listen on instead of ipc."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow binding a non-loopback address without keys."),
    curve_dir: Path | None = CurveOpt,
    heartbeat_ms: int = typer.Option(1000, "--heartbeat-ms", help="Heartbeat interval, both ways."),
    liveness: int = typer.Option(3, "--liveness", help="Missed heartbeats before a worker is dead."),
    max_queue: int = typer.Option(20_000, "--max-queue", help="Queued jobs before BUSY rejections."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Attempts per job when workers die."),
    client_timeout_s: float = typer.Option(10.0, "--client-timeout", help="Seconds of client silence "
                                           "before its jobs are cancelled."),
    group: bool = typer.Option(False, "--group", help="Let the runtime directory's group use the sockets."),
    audio_hwm: int = typer.Option(100_000, "--audio-hwm", help="Chunks queued per audio subscriber before "
                                  "PUB/SUB drops them (the replay buffer repairs drops)."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on "
                                            "127.0.0.1:PORT/metrics (needs the http extra)."),
    replay_buffer_mb: float = typer.Option(64, "--replay-buffer-mb", help="Memory for repairing lost chunks "
                                           "(0 disables repair)."),
    log_level: str = LogLevelOpt,
) -> None:
    """Run the broker in the foreground (what cosy-broker.service runs)."""
    from cosy import logs
    from cosy.broker.server import BrokerAlreadyRunning, BrokerConfig, run_broker

    logs.setup(log_level)
    eps = _endpoints(runtime_dir, bind, curve_dir)
    if eps.is_tcp and not eps.is_loopback() and not eps.secure and not insecure:
        exits.fail(f"refusing to listen on {eps.host} without CURVE keys: it is not a loopback address. "
                   "Pass --curve-dir (see `cosy keys generate`), or --insecure to do it anyway.", exits.USAGE)
    if eps.secure:
        from cosy.security import KeyError_, server_keys

        try:
            server_keys(eps.curve_dir)  # type: ignore[arg-type]
        except KeyError_ as exc:
            exits.fail(str(exc), exits.USAGE)
    config = BrokerConfig(heartbeat_s=heartbeat_ms / 1000, liveness=liveness, max_queue=max_queue,
                          max_attempts=max_attempts, client_timeout_s=client_timeout_s, group_shared=group,
                          replay_bytes=int(replay_buffer_mb * (1 << 20)), audio_hwm=audio_hwm,
                          metrics_port=metrics_port)
    try:
        raise typer.Exit(run_broker(eps, config))
    except BrokerAlreadyRunning as exc:
        exits.fail(str(exc), exits.USAGE)


@app.command()
def worker(
    engine: str = typer.Option("piper", "--engine", "-e", help="piper, cosyvoice (or tone, for tests)."),
    device: str | None = typer.Option(None, "--device", "-d", help="GPU index (sets CUDA_VISIBLE_DEVICES)."),
    name: str | None = typer.Option(None, "--name", help="Worker name [default: host:pid]."),
    option: list[str] = typer.Option([], "--option", "-O", help="Engine option key=value (repeatable)."),
    model_dir: Path | None = ModelDirOpt,
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
    curve_dir: Path | None = CurveOpt,
    heartbeat_ms: int = typer.Option(1000, "--heartbeat-ms"),
    stall_timeout: float = typer.Option(120.0, "--stall-timeout", min=0,
                                        help="Seconds a job may go without new audio before its engine counts as "
                                        "stuck: the job is retried elsewhere and the worker exits with 75 to be "
                                        "restarted (0: never)."),
    log_level: str = LogLevelOpt,
) -> None:
    """Run one worker: load an engine once, keep it warm, serve jobs from the broker."""
    from cosy.workers.main import run_worker

    if device is not None:
        # Before anything imports torch or CUDA: the only way to pick a GPU for CosyVoice.
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    eps = _endpoints(runtime_dir, connect, curve_dir)
    if eps.secure:
        from cosy.security import KeyError_, client_keys

        try:
            client_keys(eps.curve_dir)  # type: ignore[arg-type]
        except KeyError_ as exc:
            exits.fail(str(exc), exits.USAGE)
    raise typer.Exit(run_worker(engine, eps, _engine_options(engine, option, model_dir), name, heartbeat_ms / 1000,
                                log_level, device, stall_timeout))


@app.command()
def up(
    engine: str = typer.Option("piper", "--engine", "-e", help="Engine for every worker."),
    workers: int | None = typer.Option(None, "--workers", "-n", min=1, max=64,
                                       help="Worker processes [default: one per GPU for cosyvoice, else 1]."),
    option: list[str] = typer.Option([], "--option", "-O", help="Engine option key=value (repeatable)."),
    model_dir: Path | None = ModelDirOpt,
    runtime_dir: Path | None = RuntimeDirOpt,
    heartbeat_ms: int = typer.Option(1000, "--heartbeat-ms"),
    log_level: str = LogLevelOpt,
) -> None:
    """Start a broker and N workers as separate processes, in the foreground. Ctrl-C stops them all."""
    from cosy.cli.up import run_up
    from cosy.endpoints import resolve

    eps = resolve(runtime_dir, None)
    raise typer.Exit(run_up(eps, engine, workers, _engine_options(engine, option, model_dir), heartbeat_ms,
                            log_level))


@app.command()
def say(
    text: str | None = typer.Argument(None, help="Text to speak; '-' reads standard input."),
    file: Path | None = typer.Option(None, "--file", "-f", help="Read the text from a file."),
    voice: str | None = typer.Option(None, "--voice", "-v", envvar="COSY_VOICE", help="Voice name."),
    out: str | None = typer.Option(None, "--out", "-o", help="Save to FILE (.wav .flac .ogg .opus .mp3 .aac), "
                                   "'-' for stdout."),
    raw: bool = typer.Option(False, "--raw", help="With -o -: raw 16-bit little-endian PCM, not WAV."),
    no_play: bool = typer.Option(False, "--no-play", help="Do not play through the speakers."),
    speed: float = typer.Option(1.0, "--speed", "-s", help="Speaking rate, 0.25-4.0."),
    priority: str = typer.Option("interactive", "--priority", help="interactive or bulk."),
    instruct: str = typer.Option("", "--instruct", help="Speaking style for engines that take one (CosyVoice2/3), "
                                 "e.g. \"speak slowly and warmly\"."),
    timeout: float = typer.Option(120.0, "--timeout", help="Give up on a sentence without complete audio after "
                                  "this many seconds (it is retried first)."),
    list_voices: bool = typer.Option(False, "--list-voices", help="List the voices the workers serve."),
    verbose: bool = typer.Option(False, "--verbose", help="Print time to first audio and real-time factor."),
    captions: Path | None = typer.Option(None, "--captions", help="Write captions, one per sentence, to FILE "
                                         "(.srt or .vtt)."),
    flush_after: float = typer.Option(1.5, "--flush-after", help="Text from a pipe: speak what came after this "
                                      "many seconds without more, even without a sentence end."),
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
) -> None:
    """Speak TEXT of any length: play it as it is synthesized, and/or save it.

    Examples:\n
      cosy say "Hello there."\n
      echo "From a pipe." | cosy say - --out hello.wav --no-play\n
      cosy say -f book.txt -o book.flac --captions book.srt --no-play\n
      llm "tell me a story" | cosy say -\n
      cosy say -f chapter.txt -o - | aplay
    """
    # `cosy say` usually never gets here: cosy.cli.quick parses it without typer (faster start) and
    # sends only what it does not recognise to this command. Both end in run_say_args.
    from cosy.cli.quick import run_say_args

    raise typer.Exit(run_say_args(dict(
        text=text, file=file, voice=voice, out=out, raw=raw, no_play=no_play, speed=speed, priority=priority,
        instruct=instruct, timeout=timeout, list_voices=list_voices, verbose=verbose, runtime_dir=runtime_dir,
        connect=connect, captions=captions, flush_after=flush_after)))


@app.command()
def batch(
    source: str = typer.Argument(..., help="Input file, one job per line ('-' for standard input). Lines may be "
                                 "'name<TAB>text' or JSON objects with text, name, voice, speed."),
    outdir: Path = typer.Option(..., "--outdir", "-d", help="Folder for the audio files and the manifest."),
    fmt: str = typer.Option("wav", "--format",
                            help="wav, flac, ogg (Vorbis), opus, mp3 or aac (aac needs PyAV)."),
    voice: str | None = typer.Option(None, "--voice", "-v", envvar="COSY_VOICE", help="Default voice."),
    speed: float = typer.Option(1.0, "--speed", "-s", help="Default speaking rate, 0.25-4.0."),
    resume: bool = typer.Option(False, "--resume", help="Skip lines whose file is complete and unchanged."),
    window: int | None = typer.Option(None, "--window", min=1, max=4096,
                                         help="Jobs in flight [default: twice the workers' capacity]."),
    retries: int = typer.Option(2, "--retries", min=0, help="Retries of a failed line."),
    manifest: str = typer.Option("manifest.jsonl", "--manifest", help="Manifest file name inside --outdir."),
    line_timeout: float = typer.Option(600.0, "--line-timeout", help="Seconds before a line is retried."),
    captions: str | None = typer.Option(None, "--captions",
                                        help="srt or vtt: also write NAME.srt or NAME.vtt beside each file "
                                             "(the manifest always has each line's captions)."),
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
) -> None:
    """Render every line of a file to its own audio file, across all workers.

    Examples:\n
      cosy batch lines.txt --outdir wavs\n
      cosy batch lines.jsonl --outdir wavs --resume\n
      cat lines.txt | cosy batch - --outdir wavs --format flac\n
      cosy batch lines.txt --outdir mp3s --format mp3 --captions srt
    """
    from cosy.cli.batch import run_batch

    eps = _endpoints(runtime_dir, connect)
    raise typer.Exit(run_batch(eps, source=source, outdir=outdir, fmt=fmt, voice=voice, speed=speed, resume=resume,
                               window=window, retries=retries, manifest_name=manifest, timeout=line_timeout,
                               captions=captions))


@app.command()
def status(
    json_out: bool = typer.Option(False, "--json", help="Print the broker's status as JSON."),
    watch: float | None = typer.Option(None, "--watch", "-w", help="Refresh every N seconds."),
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
) -> None:
    """Show the broker, its queue and its workers."""
    from cosy.cli.status import run_status

    eps = _endpoints(runtime_dir, connect)
    raise typer.Exit(run_status(eps, json_out, watch))


# Commands that live in their own modules. Each module has register(app) and keeps its heavy
# imports inside the command functions.
COMMAND_MODULES: tuple[str, ...] = ("cosy.cli.voices_cmd", "cosy.cli.doctor", "cosy.cli.systemd_cmd",
                                     "cosy.cli.gateway_cmds", "cosy.cli.grpc_cmd", "cosy.cli.bench_cmd")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


keys_app = typer.Typer(help="CURVE keys for brokers, workers and clients on other hosts.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("generate")
def keys_generate(
    directory: Path = typer.Option(Path("."), "--dir", help="Folder for the key files."),
    name: str = typer.Option(..., "--name", help="server, client, or any name (e.g. a host's)."),
) -> None:
    """Create NAME.key (public, 0644) and NAME.key_secret (0600).

    The broker needs server.key_secret and an authorized/ folder of the public keys it lets in;
    a client or worker needs client.key_secret and the broker's server.key (see docs/deploy.md).
    """
    from cosy.security import KeyError_, generate

    try:
        public, secret = generate(directory, name)
    except KeyError_ as exc:
        exits.fail(str(exc), exits.USAGE)
    print(f"public key:  {public}\nsecret key:  {secret} (keep it private)")


def main(default_map: dict | None = None) -> None:
    """The typer app; `cosy` itself starts in cosy.cli.quick.main, which may pass the config it read."""
    from cosy.config import cli_default_map

    try:
        app(default_map=cli_default_map() if default_map is None else default_map)
    except KeyboardInterrupt:
        sys.exit(exits.INTERRUPTED)


if __name__ == "__main__":
    main()
