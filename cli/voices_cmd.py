"""`cosy voices list|add|remove|show` and `cosy voices --default NAME`: the voice registry.

The registry (cosy.voices) holds reference recordings for zero-shot engines. `list` and
`show` also ask the broker which connected workers serve each voice; when the broker is
not reachable they say so on stderr and still show the registry.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import typer

from cosy.cli import exits

RuntimeDirOpt = typer.Option(None, "--runtime-dir", envvar="COSY_RUNTIME_DIR",
                             help="Folder of the broker's ipc sockets [default: $XDG_RUNTIME_DIR/cosy].")
ConnectOpt = typer.Option(None, "--connect", envvar="COSY_CONNECT", help="tcp://HOST:PORT of a broker.")

voices_app = typer.Typer(
    name="voices",
    no_args_is_help=False,
    invoke_without_command=True,
)


# --- helpers shared with `cosy doctor` -------------------------------------------------------


def resolve_endpoints(runtime_dir: Path | None, connect: str | None) -> Any:
    from cosy.endpoints import EndpointError, resolve

    try:
        return resolve(runtime_dir, connect)
    except EndpointError as exc:
        exits.fail(str(exc), exits.USAGE)


def try_fetch_status(eps: Any, timeout_s: float = 2.0) -> tuple[dict[str, Any] | None, str]:
    """The broker's status, or (None, the one-line reason it is not available). Never exits."""
    from cosy.cli.status import fetch_status

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return fetch_status(eps, timeout_s=timeout_s), ""
    except SystemExit:
        reason = err.getvalue().strip().removeprefix("cosy: ")
        return None, reason or f"the broker at {eps.front} is not reachable"


def servers_by_voice(status: dict[str, Any] | None) -> dict[str, list[str]]:
    """voice name -> names of the connected workers that announce it."""
    out: dict[str, list[str]] = {}
    for w in (status or {}).get("workers", []):
        for v in w.get("voices", []):
            out.setdefault(v, []).append(w["name"])
    return out


def _registry() -> list[Any]:
    from cosy.voices import list_voices

    return list_voices()


def _source(voice: Any) -> str:
    from cosy.voices import shipped_dir

    return "shipped" if Path(voice.folder).parent == shipped_dir() else "user"


def _default_voice() -> str | None:
    from cosy.config import ConfigError, load_config

    try:
        return load_config(warn=lambda _m: None).get("voice")
    except ConfigError:
        return None


def voice_rows(status: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per registry voice, then one per voice only a worker knows (e.g. Piper's built-in one)."""
    served = servers_by_voice(status)
    default = _default_voice()
    rows = []
    for v in _registry():
        rows.append({"name": v.name, "source": _source(v), "language": v.language, "duration_s": v.duration_s,
                     "transcript": v.transcript, "folder": v.folder, "default": v.name == default,
                     "workers": sorted(served.get(v.name, []))})
    known = {r["name"] for r in rows}
    for name in sorted(set(served) - known):
        rows.append({"name": name, "source": "worker", "language": "", "duration_s": None, "transcript": "",
                     "folder": "", "default": name == default, "workers": sorted(served[name])})
    return rows


# --- commands ------------------------------------------------------------------------------


@voices_app.callback()
def voices_main(
    ctx: typer.Context,
    default: str | None = typer.Option(None, "--default", help="Make NAME the default voice (config file key "
                                       "`voice`) for cosy say and cosy batch."),
) -> None:
    """The voice registry: reference voices for zero-shot engines, and which workers serve them.

    With no command: `cosy voices list`.

    Examples:\n
      cosy voices list\n
      cosy voices add ana ana.wav --text "What Ana says in the recording." --language en\n
      cosy voices show ana\n
      cosy voices --default ana\n
      cosy voices remove ana
    """
    if default is not None:
        _set_default(default)
        if ctx.invoked_subcommand is None:
            raise typer.Exit(exits.OK)
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd, json_out=False, runtime_dir=None, connect=None)


def _set_default(name: str) -> None:
    from cosy.config import ConfigError, config_path, set_value

    rows = {r["name"] for r in voice_rows(None)}
    if name not in rows:
        print(f"cosy: note: {name!r} is not in the registry; it must be a voice a worker serves "
              f"(registry: {', '.join(sorted(rows)) or 'empty'})", file=sys.stderr)
    try:
        path = set_value("voice", name)
    except OSError as exc:
        _write_failed(exc, config_path(), "setting the default voice", "the config file is unchanged")
    except ConfigError as exc:
        exits.fail(f"cannot set the default voice: {exc}", exits.USAGE)
    print(f"default voice: {name} (in {path})")


def _write_failed(exc: OSError, where: Path, doing: str, outcome: str) -> NoReturn:
    """A registry or config write under ``where`` that failed: exit 5 (NO_SPACE) for a full, over-quota or
    read-only disk, else 2."""
    from cosy import diskspace

    if diskspace.is_no_space(exc):
        exits.fail(f"{diskspace.describe(exc, where)} {doing}; {outcome}", exits.NO_SPACE)
    exits.fail(f"{exc.strerror or exc} {doing} ({where}); {outcome}", exits.USAGE)


@voices_app.command("list")
def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print the voices as JSON."),
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
) -> None:
    """List the registry's voices and the workers that serve each (if a broker is reachable)."""
    status, reason = try_fetch_status(resolve_endpoints(runtime_dir, connect))
    rows = voice_rows(status)
    if json_out:
        print(json.dumps({"broker": status is not None, "broker_error": reason or None, "voices": rows}, indent=2))
        if reason:
            print(f"cosy: {reason}; showing the registry only", file=sys.stderr)
        raise typer.Exit(exits.OK)
    if reason:
        print(f"cosy: {reason}; showing the registry only", file=sys.stderr)
    _print_table(rows, status is not None)


def _print_table(rows: list[dict[str, Any]], with_workers: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(rows)} voice(s)")
    for col in ("voice", "source", "language", "seconds", "served by"):
        table.add_column(col)
    for r in rows:
        served = ", ".join(r["workers"]) if r["workers"] else ("none" if with_workers else "?")
        seconds = f"{r['duration_s']:.1f}" if r["duration_s"] is not None else ""
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(escape(name), r["source"], escape(r["language"] or ""), seconds, escape(served))
    Console().print(table)


@voices_app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="Voice name: a-z 0-9 _ -, up to 64 characters."),
    audio: Path = typer.Argument(..., help="Reference recording (wav/flac/ogg), 3-30 s of one speaker."),
    text: str = typer.Option(..., "--text", "-t", help="The exact transcript of the recording."),
    language: str = typer.Option("", "--language", "-l", help="Language code, e.g. en, zh, de."),
    description: str = typer.Option("", "--description", help="A free-text description."),
    licence: str = typer.Option("", "--licence", help="Licence or consent note for the recording."),
    replace: bool = typer.Option(False, "--replace", help="Replace a user voice of the same name."),
) -> None:
    """Validate a reference recording (readable, 3-30 s, downmixed, resampled to 24 kHz) and store it.

    The voice is stored whole or not at all; on a full disk (or quota, or read-only folder) nothing is added and
    the exit code is 5.

    Example:\n
      cosy voices add ana ana.wav --text "What Ana says in the recording." --language en
    """
    from cosy.voices import NoSpaceError, VoiceError, add_voice, user_dir

    if not audio.is_file():
        exits.fail(f"cannot read {audio}: no such file", exits.USAGE)
    try:
        voice = add_voice(name, audio, text, language=language, licence=licence, description=description,
                          replace=replace)
    except VoiceError as exc:
        exits.fail(" ".join(str(exc).split()), exits.USAGE)
    except NoSpaceError as exc:  # a full disk, a quota, a read-only folder: nothing was added
        exits.fail(str(exc), exits.NO_SPACE)
    except OSError as exc:
        exits.fail(f"cannot store the voice in {user_dir()}: {exc.strerror or exc}", exits.USAGE)
    print(f"added voice {voice.name}: {voice.duration_s:.1f} s at {voice.sample_rate} Hz in {voice.folder}")


@voices_app.command("remove")
def remove_cmd(name: str = typer.Argument(..., help="A user voice (shipped voices cannot be removed).")) -> None:
    """Remove a user voice from the registry."""
    from cosy.voices import VoiceError, remove_voice, user_dir

    try:
        remove_voice(name)
    except VoiceError as exc:
        exits.fail(str(exc), exits.USAGE)
    except OSError as exc:
        _write_failed(exc, user_dir(), f"removing the voice {name}", "nothing was removed")
    print(f"removed voice {name}")
    if _default_voice() == name:
        print(f"cosy: note: {name} was the default voice; set another with `cosy voices --default NAME`",
              file=sys.stderr)


@voices_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Voice name."),
    json_out: bool = typer.Option(False, "--json", help="Print the voice as JSON."),
    runtime_dir: Path | None = RuntimeDirOpt,
    connect: str | None = ConnectOpt,
) -> None:
    """Print a voice's metadata and the workers that serve it."""
    from cosy.voices import VoiceError, get_voice

    try:
        voice = get_voice(name)
    except VoiceError as exc:
        exits.fail(str(exc), exits.USAGE)
    status, reason = try_fetch_status(resolve_endpoints(runtime_dir, connect))
    info = {"name": voice.name, "source": _source(voice), "language": voice.language,
            "transcript": voice.transcript, "duration_s": voice.duration_s, "sample_rate": voice.sample_rate,
            "audio": str(voice.audio_path), "licence": voice.licence, "description": voice.description,
            "default": _default_voice() == voice.name,
            "workers": sorted(servers_by_voice(status).get(voice.name, [])) if status else None}
    if json_out:
        print(json.dumps(info, indent=2))
        raise typer.Exit(exits.OK)
    if reason:
        print(f"cosy: {reason}; cannot tell which workers serve it", file=sys.stderr)
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    for key, value in info.items():
        if key == "workers":
            value = ", ".join(value) if value else ("none" if status else "?")
        table.add_row(key, escape("" if value is None else str(value)))
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(voices_app, name="voices")
