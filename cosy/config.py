"""The optional config file: defaults for the `cosy` command.

Where: ``$COSY_CONFIG`` if set, else ``$XDG_CONFIG_HOME/cosy/config.toml``, else
``~/.config/cosy/config.toml``. A missing file is no error. Keys (all optional)::

    voice = "joe"                  # default for --voice (cosy say, cosy batch)
    speed = 1.0                    # default for --speed, 0.25-4.0
    runtime_dir = "/run/cosy"      # default for --runtime-dir (every command that talks to a broker)
    connect = "tcp://gpu1:5555"    # default for --connect (clients and workers)

    [voice_aliases]                # `cosy http`: what a request's voice names (gateways/voice_names.py)
    alloy = "joe"                  # one of OpenAI's names, or any name of your own
    "*" = "joe"                    # every OpenAI name without an alias of its own

Precedence, highest first: the command line, the environment (``COSY_VOICE``,
``COSY_RUNTIME_DIR``, ``COSY_CONNECT``), this file, the built-in default. The file is
applied as click's ``default_map`` (see :func:`cli_default_map`), which click consults
after the command line and the environment variable and before the built-in default.

Read with :mod:`tomllib` (Python 3.11+); on 3.10 with ``tomli`` when installed, else the
file is ignored with a warning.

``voice_aliases`` is not a click default: ``cosy http`` merges it with its ``--voice-alias``
options (an option wins for the same name), see :func:`voice_aliases`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEYS: dict[str, type] = {"voice": str, "speed": float, "runtime_dir": str, "connect": str, "voice_aliases": dict}

# Which options of which command each key is the default for: {command path: {parameter name: key}}.
# A command that does not exist (yet) is harmless: click only reads the entries it needs.
_CLIENT = {"runtime_dir": "runtime_dir", "connect": "connect"}
COMMAND_KEYS: dict[tuple[str, ...], dict[str, str]] = {
    ("say",): {"voice": "voice", "speed": "speed", **_CLIENT},
    ("batch",): {"voice": "voice", "speed": "speed", **_CLIENT},
    ("status",): _CLIENT,
    ("worker",): _CLIENT,
    ("broker",): {"runtime_dir": "runtime_dir"},
    ("up",): {"runtime_dir": "runtime_dir"},
    ("doctor",): _CLIENT,
    ("http",): _CLIENT,
    ("wyoming",): _CLIENT,
    ("voices", "list"): _CLIENT,
    ("voices", "show"): _CLIENT,
}

Warn = Callable[[str], None]


class ConfigError(ValueError):
    """The config file exists but cannot be used; the message is one line."""


def _stderr(message: str) -> None:
    print(f"cosy: {message}", file=sys.stderr)


def config_path() -> Path:
    env = os.environ.get("COSY_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cosy" / "config.toml"


def _toml_loads() -> Callable[[str], dict[str, Any]] | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            return None
    return tomllib.loads


def validate(data: dict[str, Any], where: str = "the config file", warn: Warn = _stderr) -> dict[str, Any]:
    """Check types and ranges; unknown keys are warned about and dropped (a newer cosy may know them)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        kind = KEYS.get(key)
        if kind is None:
            warn(f"{where}: unknown key {key!r} ignored (known: {', '.join(KEYS)})")
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a {kind.__name__}, not {type(value).__name__}")
        out[key] = value
    if "speed" in out and not 0.25 <= out["speed"] <= 4.0:
        raise ConfigError(f"{where}: speed {out['speed']} is outside 0.25-4.0")
    if "voice" in out and not out["voice"].strip():
        raise ConfigError(f"{where}: voice is empty")
    for name, target in out.get("voice_aliases", {}).items():
        if not isinstance(target, str) or not target.strip() or not name.strip():
            raise ConfigError(f"{where}: voice_aliases.{name} must be a voice name (a non-empty string)")
    return out


def voice_aliases(warn: Warn = _stderr) -> dict[str, str]:
    """The config file's ``[voice_aliases]`` table; {} when there is none or the file is broken (warned)."""
    try:
        table = load_config(warn=warn).get("voice_aliases", {})
    except ConfigError as exc:
        warn(f"ignoring the config file: {exc}")
        return {}
    return {str(k).strip(): str(v).strip() for k, v in table.items()}


def load_config(path: Path | None = None, warn: Warn = _stderr) -> dict[str, Any]:
    """The validated settings of the config file; {} when there is none. Raises ConfigError when unusable."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    loads = _toml_loads()
    if loads is None:
        warn(f"ignoring {path}: reading TOML on Python {sys.version_info[0]}.{sys.version_info[1]} "
             "needs `pip install tomli`")
        return {}
    try:
        data = loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return validate(data, str(path), warn)


def default_map(settings: dict[str, Any]) -> dict[str, Any]:
    """click's ``default_map`` (nested by command) for these settings."""
    out: dict[str, Any] = {}
    for command, params in COMMAND_KEYS.items():
        values = {param: settings[key] for param, key in params.items() if key in settings}
        if not values:
            continue
        node = out
        for part in command[:-1]:
            node = node.setdefault(part, {})
        node[command[-1]] = values
    return out


def cli_default_map(warn: Warn = _stderr) -> dict[str, Any]:
    """What ``cosy`` passes to the app: the file's defaults, or none (with a one-line warning) if it is broken.

    A broken config file must not lock people out of ``cosy doctor`` or ``cosy voices --default``,
    so it is reported and ignored here; ``cosy doctor`` reports it as a failed check.
    """
    try:
        return default_map(load_config(warn=warn))
    except ConfigError as exc:
        warn(f"ignoring the config file: {exc}")
        return {}


# --- writing one key (cosy voices --default) ----------------------------------------------


def _toml_value(value: str | float) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string: same escapes as JSON
    return repr(float(value))


def set_value(key: str, value: str | float, path: Path | None = None) -> Path:
    """Set one top-level key in the config file, keeping the rest of the file as it is. Atomic."""
    if key not in KEYS:
        raise ConfigError(f"unknown config key {key!r}")
    validate({key: value}, warn=lambda _m: None)
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    line = f"{key} = {_toml_value(value)}"
    lines = text.splitlines()
    first_table = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("[")), len(lines))
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    for i in range(first_table):
        if pattern.match(lines[i]):
            lines[i] = line
            break
    else:
        lines.insert(first_table, line)
    new_text = "\n".join(lines) + "\n"
    loads = _toml_loads()
    if loads is not None:
        try:
            loads(new_text)
        except ValueError as exc:
            raise ConfigError(f"{path} is not valid TOML, not changing it: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    from cosy import diskspace

    diskspace.write_atomic(path, new_text.encode("utf-8"))  # a failed write (a full disk) leaves no temporary file
    return path
