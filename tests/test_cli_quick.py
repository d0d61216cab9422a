"""`cosy say` is parsed without typer (cli/quick.py) for a fast start; the typer command stays the reference.

Both paths must hand run_say_args the same parameters for every command line, environment and config file;
whatever the quick parser does not recognise must reach typer (help, errors).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cosy.cli import quick
from cosy.cli.main import app

CASES: list[list[str]] = [
    ["Hello there."],
    ["-"],
    ["Hello", "-v", "joe", "-o", "out.wav", "--no-play"],
    ["--voice=joe", "--out", "-", "--raw", "Hi."],
    ["-f", "text.txt", "--speed", "1.25", "--priority", "bulk", "--timeout", "5"],
    ["-s", "0.5", "--instruct", "speak slowly", "--verbose", "x"],
    ["--list-voices"],
    ["--runtime-dir", "/tmp/somewhere", "a"],
    ["--connect", "tcp://127.0.0.1:5555", "a"],
    ["--", "-starts with a dash"],
    ["--speed=-1", "negative speeds are run_say's error, not the parser's"],
]
ENVS: list[dict[str, str]] = [
    {},
    {"COSY_VOICE": "env-voice", "COSY_RUNTIME_DIR": "/tmp/env-rd", "COSY_CONNECT": "tcp://127.0.0.1:7000"},
]
CONFIGS: list[dict[str, Any]] = [
    {},
    {"voice": "cfg-voice", "speed": 1.5, "runtime_dir": "/tmp/cfg-rd", "connect": "tcp://127.0.0.1:6000"},
]


def _typer_params(args: list[str], env: dict[str, str], config: dict[str, Any],
                  monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def capture(params: dict[str, Any]) -> int:
        seen.append(params)
        return 0

    monkeypatch.setattr(quick, "run_say_args", capture)
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("COSY_")}
    result = CliRunner().invoke(app, ["say", *args], env={**unset, **env},
                                default_map={"say": config} if config else {})
    assert result.exit_code == 0, result.output
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("config", CONFIGS, ids=["no-config", "config"])
@pytest.mark.parametrize("env", ENVS, ids=["no-env", "env"])
@pytest.mark.parametrize("args", CASES, ids=[" ".join(c)[:40] for c in CASES])
def test_quick_parser_matches_typer(args: list[str], env: dict[str, str], config: dict[str, Any],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _typer_params(args, env, config, monkeypatch)
    got = quick.parse_say(args, env=env, config=config)
    assert got == expected


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--speed", "fast", "x"], ["a", "b"], ["--vioce", "joe", "x"],
                                  ["-vjoe", "x"], ["--raw=yes", "x"], ["x", "--voice"]])
def test_quick_parser_leaves_the_rest_to_typer(args: list[str]) -> None:
    assert quick.parse_say(args, env={}) is None


def _cosy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosy", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_say_help_and_errors_still_come_from_typer(tmp_path: Path) -> None:
    help_ = _cosy("say", "--help")
    assert help_.returncode == 0 and "--no-play" in help_.stdout
    typo = _cosy("say", "--vioce", "joe", "hello")
    assert typo.returncode == 2 and "--vioce" in typo.stderr


def test_quick_say_reports_a_missing_broker(tmp_path: Path) -> None:
    """The quick path reaches run_say: no broker gives its exit code 3 and its one line."""
    r = _cosy("say", "hello", "--no-play", "--runtime-dir", str(tmp_path))
    assert r.returncode == 3, r.stderr
    assert f"no broker at ipc://{tmp_path}" in r.stderr
