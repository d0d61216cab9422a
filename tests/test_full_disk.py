"""A full disk where cosy writes files: the voice registry (`cosy voices add`, the HTTP voice upload) and a worker's
cache folder. Each on a small tmpfs the test mounts itself (as root; elsewhere it skips and says so, tests/tmpfs.py).

What must hold: one clear line that names the filesystem, the documented exit code (5, cli/exits.py NO_SPACE) or
HTTP status (507), no traceback, nothing half-written or temporary left behind, a voice being replaced kept as it
was, and after space is freed the same command works. A worker's cache that cannot be written costs only the cache:
tests/test_cosyvoice_full_disk.py runs a real CosyVoice worker on a full one.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from stack import Stack
from tmpfs import fill, small_tmpfs

from cosy.cli import exits

SIZE = 600 * 1024  # a voice is 4 s x 24 kHz x 2 bytes = 192 KB: two fit, not three
COSY = [sys.executable, "-m", "cosy"]


def reference(path: Path, seconds: float = 4.0, rate: int = 22050) -> Path:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * (150 + 40 * t) * t), rate, subtype="PCM_16")
    return path


def cosy_voices(voices: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COSY_VOICES_DIR": str(voices), "COSY_CONFIG": str(voices.parent / "none.toml")}
    return subprocess.run([*COSY, "voices", *args], env=env, capture_output=True, text=True, timeout=60)


def voices_add(voices: Path, *args: str) -> subprocess.CompletedProcess:
    return cosy_voices(voices, "add", *args)


def entries(folder: Path) -> list[str]:
    """Everything in the registry folder, hidden temporary folders included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_one_clean_line(stderr: str, *parts: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


# --- cosy voices add ----------------------------------------------------------------------------------------


def test_voices_add_on_a_full_disk_says_so_adds_nothing_and_works_once_space_is_freed(tmp_path: Path) -> None:
    ref = reference(tmp_path / "ana.wav")
    with small_tmpfs(SIZE) as disk:
        voices = disk / "voices"
        voices.mkdir()
        fill(disk, leave_bytes=16 * 1024)
        full = voices_add(voices, "ana", str(ref), "--text", "Hello there, this is Ana.")
        assert full.returncode == exits.NO_SPACE == 5, full.stderr
        assert_one_clean_line(full.stderr, f"no space left on {disk} (tmpfs)", "writing the voice ana",
                              "nothing was added")
        assert entries(voices) == []  # no voice, no temporary folder

        (disk / ".filler").unlink()
        again = voices_add(voices, "ana", str(ref), "--text", "Hello there, this is Ana.")
        assert again.returncode == 0, again.stderr
        assert entries(voices) == ["ana"]
        meta = json.loads((voices / "ana" / "voice.json").read_text())
        assert meta["transcript"] == "Hello there, this is Ana." and meta["duration_s"] == 4.0
        import soundfile as sf

        audio, rate = sf.read(str(voices / "ana" / "reference.wav"))
        assert rate == 24000 and len(audio) == 4 * 24000


def test_replacing_a_voice_on_a_full_disk_keeps_the_old_one(tmp_path: Path) -> None:
    """The new recording (6 s) does not fit even where the old one (4 s) was: the old one must stay."""
    ref, longer = reference(tmp_path / "ana.wav"), reference(tmp_path / "ana-6s.wav", seconds=6.0)
    with small_tmpfs(SIZE) as disk:
        voices = disk / "voices"
        assert voices_add(voices, "ana", str(ref), "--text", "The first words.").returncode == 0
        before = {p.name: p.read_bytes() for p in (voices / "ana").iterdir()}
        fill(disk, leave_bytes=16 * 1024)
        full = voices_add(voices, "ana", str(longer), "--text", "The second words.", "--replace")
        assert full.returncode == exits.NO_SPACE, full.stderr
        assert_one_clean_line(full.stderr, "no space left on", "writing the voice ana", "nothing was added")
        assert entries(voices) == ["ana"]
        assert {p.name: p.read_bytes() for p in (voices / "ana").iterdir()} == before  # untouched

        (disk / ".filler").unlink()
        done = voices_add(voices, "ana", str(longer), "--text", "The second words.", "--replace")
        assert done.returncode == 0, done.stderr
        assert entries(voices) == ["ana"]
        meta = json.loads((voices / "ana" / "voice.json").read_text())
        assert meta["transcript"] == "The second words." and meta["duration_s"] == 6.0


def test_voices_add_and_remove_on_a_read_only_filesystem(tmp_path: Path) -> None:
    ref = reference(tmp_path / "ana.wav")
    with small_tmpfs(SIZE) as disk:
        voices = disk / "voices"
        assert voices_add(voices, "bob", str(ref), "--text", "Bob's words.").returncode == 0
        remount = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True, timeout=30)
        assert remount.returncode == 0, remount.stderr
        try:
            ro = voices_add(voices, "ana", str(ref), "--text", "Hello.")
            rm = cosy_voices(voices, "remove", "bob")
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], capture_output=True, timeout=30)
        assert ro.returncode == exits.NO_SPACE, ro.stderr
        assert_one_clean_line(ro.stderr, f"read-only filesystem on {disk} (tmpfs)", "writing the voice ana")
        assert rm.returncode == exits.NO_SPACE, rm.stderr
        assert_one_clean_line(rm.stderr, f"read-only filesystem on {disk} (tmpfs)", "removing the voice bob",
                              "nothing was removed")
        assert entries(voices) == ["bob"] and (voices / "bob" / "reference.wav").is_file()
        assert cosy_voices(voices, "remove", "bob").returncode == 0  # writable again: it goes, whole
        assert entries(voices) == []


def test_setting_the_default_voice_on_a_full_disk_is_exit_5(tmp_path: Path) -> None:
    with small_tmpfs(SIZE) as disk:
        config = disk / "config.toml"
        config.write_text('voice = "joe"\n')
        fill(disk, leave_bytes=0)
        env = {**os.environ, "COSY_VOICES_DIR": str(tmp_path / "voices"), "COSY_CONFIG": str(config)}
        done = subprocess.run([*COSY, "voices", "--default", "x" * 5000], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == exits.NO_SPACE, done.stderr
        assert f"no space left on {disk} (tmpfs) setting the default voice" in done.stderr
        assert "Traceback" not in done.stderr
        assert config.read_text() == 'voice = "joe"\n'
        assert entries(disk) == [".filler", "config.toml"]  # no temporary config file left


def test_a_writer_killed_mid_store_leaves_nothing_the_next_one_does_not_undo(tmp_path: Path) -> None:
    """What a SIGKILLed `voices add --replace` can leave: its temporary folder, and the old voice moved aside."""
    from cosy.voices import list_voices, store_voice

    voices = tmp_path / "voices"
    mono = np.sin(np.arange(3 * 24000) / 10).astype(np.float32) * 0.3
    store_voice("ana", mono, 24000, "Ana's words.", dest=voices)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=30)
    pid = int(dead.stdout)  # a process that has ended
    (voices / "ana").rename(voices / f".ana.{pid}.0badc0de.old")
    (voices / f".ana.{pid}.0badc0de.tmp").mkdir()
    (voices / f".ana.{pid}.0badc0de.tmp" / "reference.wav").write_bytes(b"RIFF half")
    store_voice("bob", mono, 24000, "Bob's words.", dest=voices)
    assert entries(voices) == ["ana", "bob"]
    assert [v.name for v in list_voices([voices])] == ["ana", "bob"]
    assert json.loads((voices / "ana" / "voice.json").read_text())["transcript"] == "Ana's words."


# --- POST /v1/audio/voices --------------------------------------------------------------------------------------


def test_http_voice_upload_on_a_full_disk_is_507_and_stores_nothing(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    pytest.importorskip("av")
    httpx = pytest.importorskip("httpx")
    from test_http_gateway import GatewayProcess, assert_openai_error
    from test_openai_surface import start_echo_worker, voice_wav

    with small_tmpfs(SIZE) as disk:
        voices = disk / "voices"
        voices.mkdir()
        s = Stack(env={"COSY_VOICES_DIR": str(voices), "COSY_CONFIG": str(tmp_path / "none.toml")})
        try:
            s.start_broker()
            start_echo_worker(s, "echo-0", tmp_path / "echo.jsonl")  # a worker that clones, as CosyVoice does
            gw = GatewayProcess(s, "http", []).start().wait_ready()

            def upload() -> httpx.Response:
                return httpx.post(f"{gw.url}/v1/audio/voices", data={"name": "guest", "transcript": "My words."},
                                  files={"audio_sample": ("g.wav", voice_wav(4.0), "audio/wav")}, timeout=60)

            fill(disk, leave_bytes=16 * 1024)
            full = upload()
            assert full.status_code == 507, full.text
            assert_openai_error(full.json(), "insufficient_storage")
            message = full.json()["error"]["message"]
            assert f"no space left on {disk} (tmpfs)" in message and "the voice guest" in message, message
            assert full.json()["error"]["type"] == "server_error"
            assert entries(voices) == []
            assert "Traceback" not in s.log_text()

            (disk / ".filler").unlink()
            ok = upload()
            assert ok.status_code == 200, ok.text
            assert entries(voices) == ["guest"]
            speech = httpx.post(f"{gw.url}/v1/audio/speech", json={"input": "Hi.", "voice": "guest",
                                                                    "response_format": "wav"}, timeout=60)
            assert speech.status_code == 200, speech.text
            import soundfile as sf

            assert len(sf.read(io.BytesIO(speech.content))[0]) > 0
        finally:
            s.stop()


# --- a worker's cache folder ---------------------------------------------------------------------------------


def test_a_cache_folder_on_a_full_disk_loses_entries_warns_once_and_leaves_no_temporary_files(
        caplog: pytest.LogCaptureFixture) -> None:
    from cosy.workers.engines.cosyvoice import CacheFolder

    with small_tmpfs(SIZE) as disk:
        cache = CacheFolder(disk / "cache")
        assert cache.write(disk / "cache" / "prompts" / "a.pt", b"x" * 1000)  # room: stored
        fill(disk, leave_bytes=16 * 1024)
        with caplog.at_level(logging.DEBUG, logger="cosy.engine.cosyvoice"):
            for i in range(5):
                assert not cache.write(disk / "cache" / "prompts" / f"big{i}.pt", b"x" * 100_000)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"no space left on {disk} (tmpfs)" in warnings[0].getMessage()
        assert "serving without it" in warnings[0].getMessage()
        assert cache.failures == 5
        assert entries(disk / "cache" / "prompts") == ["a.pt"]  # the old entry whole, nothing partial
        assert (disk / "cache" / "prompts" / "a.pt").read_bytes() == b"x" * 1000


def test_a_trt_plan_that_does_not_fit_leaves_no_partial_plan() -> None:
    from cosy.workers.engines.cosyvoice import ensure_trt_plan

    def build(tmp: Path) -> None:  # as the library's converter writes the serialised engine
        with open(tmp, "wb") as f:
            f.write(b"\1" * (1 << 20))

    with small_tmpfs(SIZE) as disk:
        with pytest.raises(OSError) as info:
            ensure_trt_plan(disk / "trt", "k", build)
        assert info.value.errno == errno.ENOSPC
        assert entries(disk / "trt") == ["k.lock"]  # no plan, no temporary file


def test_no_space_errors_are_named_for_the_filesystem(tmp_path: Path) -> None:
    from cosy import diskspace

    assert diskspace.is_no_space(OSError(errno.ENOSPC, "x")) and diskspace.is_no_space(OSError(errno.EDQUOT, "x"))
    assert diskspace.is_no_space(OSError(errno.EROFS, "x")) and not diskspace.is_no_space(OSError(errno.EACCES, "x"))
    assert not diskspace.is_no_space(RuntimeError("System error."))
    point, _ = diskspace.mount_of(tmp_path / "not" / "yet")  # a path that does not exist yet: its parent's
    assert point == diskspace.mount_of(tmp_path)[0] and os.path.ismount(point)
    assert diskspace.describe(OSError(errno.EDQUOT, "x"), tmp_path).startswith("disk quota exceeded on ")
