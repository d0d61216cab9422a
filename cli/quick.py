"""The `cosy` entry point, and a parser for `cosy say` that does not import typer.

`cosy say "text"` is the command people wait on: importing typer and declaring every command costs
~70 ms before the job can even be submitted (`python -X importtime`). So the entry point reads a
plain `cosy say` command line itself and goes straight to :func:`cosy.cli.say.run_say`; anything it
does not recognise (``--help``, a typo, a malformed value, an unusual spelling such as ``-vjoe``) goes
to the typer app, which gives the help or the error message. Both paths call ``run_say`` with the same
arguments and apply the same precedence (command line, environment, config file, built-in default);
``tests/test_cli_quick.py`` compares them on every option.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cosy.cli import exits

# option spelling -> (parameter, kind). kind: "str", "path", "float", or "flag" (takes no value).
SAY_OPTIONS: dict[str, tuple[str, str]] = {
    "--file": ("file", "path"), "-f": ("file", "path"),
    "--voice": ("voice", "str"), "-v": ("voice", "str"),
    "--out": ("out", "str"), "-o": ("out", "str"),
    "--raw": ("raw", "flag"),
    "--no-play": ("no_play", "flag"),
    "--speed": ("speed", "float"), "-s": ("speed", "float"),
    "--priority": ("priority", "str"),
    "--instruct": ("instruct", "str"),
    "--timeout": ("timeout", "float"),
    "--list-voices": ("list_voices", "flag"),
    "--verbose": ("verbose", "flag"),
    "--runtime-dir": ("runtime_dir", "path"),
    "--connect": ("connect", "str"),
    "--captions": ("captions", "path"),
    "--flush-after": ("flush_after", "float"),
}
SAY_DEFAULTS: dict[str, Any] = {
    "text": None, "file": None, "voice": None, "out": None, "raw": False, "no_play": False, "speed": 1.0,
    "priority": "interactive", "instruct": "", "timeout": 120.0, "list_voices": False, "verbose": False,
    "runtime_dir": None, "connect": None, "captions": None, "flush_after": 1.5,
}
SAY_ENV = {"voice": "COSY_VOICE", "runtime_dir": "COSY_RUNTIME_DIR", "connect": "COSY_CONNECT"}
PATH_PARAMS = {param for param, kind in SAY_OPTIONS.values() if kind == "path"}


def _as_param(param: str, value: Any) -> Any:
    """A value from the command line, the environment or the config file, as typer converts it."""
    return Path(value) if param in PATH_PARAMS else value


def parse_say(args: list[str], env: Mapping[str, str] | None = None,
              config: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The parameters of `cosy say ARGS` as typer would pass them, or None to leave ARGS to typer.

    ``config`` is the `say` section of the config file's default map (what typer gets as default_map).
    """
    env = os.environ if env is None else env
    given: dict[str, Any] = {}
    i = 0
    only_args = False
    while i < len(args):
        arg = args[i]
        i += 1
        if only_args or arg == "-" or not arg.startswith("-"):
            if "text" in given:
                return None  # a second TEXT: typer's error
            given["text"] = arg
            continue
        if arg == "--":
            only_args = True
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        spec = SAY_OPTIONS.get(name)
        if spec is None:
            return None  # --help, a typo, -vjoe: typer decides
        param, kind = spec
        if kind == "flag":
            if eq:
                return None
            given[param] = True
            continue
        if not eq:
            if i >= len(args):
                return None  # missing value
            value = args[i]
            i += 1
        if kind == "float":
            try:
                given[param] = float(value)
            except ValueError:
                return None
        else:
            given[param] = _as_param(param, value)
    out = dict(SAY_DEFAULTS)
    for param, default in (config or {}).items():
        if param in out:
            out[param] = _as_param(param, default)
    for param, var in SAY_ENV.items():
        if env.get(var):
            out[param] = _as_param(param, env[var])
    out.update(given)
    return out


def endpoints_or_fail(runtime_dir: Path | None, url: str | None, curve_dir: Path | None = None):
    """The broker's endpoints for these options, or a one-line usage error."""
    from cosy.endpoints import EndpointError, resolve

    try:
        return resolve(runtime_dir, url, curve_dir)
    except EndpointError as exc:
        exits.fail(str(exc), exits.USAGE)


def run_say_args(p: dict[str, Any]) -> int:
    from cosy.cli.say import run_say

    eps = endpoints_or_fail(p["runtime_dir"], p["connect"])
    return run_say(eps, text=p["text"], file=p["file"], voice=p["voice"], out=p["out"], raw=p["raw"],
                   play=not p["no_play"], speed=p["speed"], priority=p["priority"], timeout=p["timeout"],
                   list_voices=p["list_voices"], verbose=p["verbose"], instruct=p["instruct"],
                   captions=p["captions"], flush_after=p["flush_after"])


def main() -> None:
    argv = sys.argv[1:]
    default_map = None
    if argv[:1] == ["say"]:
        from cosy.config import cli_default_map

        default_map = cli_default_map()
        params = parse_say(argv[1:], config=default_map.get("say"))
        if params is not None:
            try:
                code = run_say_args(params)
            except KeyboardInterrupt:
                code = exits.INTERRUPTED
            sys.exit(code)
    from cosy.cli.main import main as typer_main

    typer_main(default_map)
