"""A CosyVoice worker whose cache folder is on a full disk still starts and serves: it only loses the cache.

The real library on the generated tiny model (tests/tiny_cosyvoice.py), in a real worker process behind a real
broker, with ``cache_dir`` on a small tmpfs the test mounts and fills (as root; elsewhere it skips and says so,
tests/tmpfs.py). The worker computes two voices' prompt features at start and cannot keep either: one warning in
its log, not one per voice or per job, both failures counted in its ``cache_write_failures`` metric, and nothing
written to the cache. The tiny model gives 20 speech tokens x 960 samples at 24 kHz per byte of text.

Like the other CosyVoice tests this needs torch and the library (CI: .venv-cosyvoice); elsewhere it skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cosyvoice_env import needs_library
from stack import Stack, read_wav
from tmpfs import fill, small_tmpfs

pytestmark = [needs_library, pytest.mark.timeout(900)]

SAMPLES_PER_BYTE = 20 * 960
WARNING = "cannot write the cache"


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def test_a_worker_with_a_full_cache_disk_serves_real_audio_and_warns_once(tmp_path: Path) -> None:
    from tiny_cosyvoice import make_tiny_model, make_voice

    voices = tmp_path / "voices"
    make_voice(voices, "tiny")
    make_voice(voices, "other", transcript="Another short reference.")
    model = make_tiny_model(tmp_path / "model")
    with small_tmpfs(256 * 1024) as disk:
        fill(disk, leave_bytes=0)
        s = Stack(env={"COSY_CONFIG": str(tmp_path / "none.toml")})
        try:
            s.start_broker()
            s.start_worker("cosyvoice", name="cv", wait=False, options={
                "model_dir": model, "voices_dir": voices, "cache_dir": disk / "cache", "text_frontend": "false",
                "capacity": 2})
            info = s.wait_worker("cv", timeout=300)
            assert sorted(info["voices"]) == ["other", "tiny"]

            for voice, text in (("tiny", "Hi"), ("other", "Hey"), ("tiny", "Ok!")):
                out = tmp_path / f"{voice}-{len(text)}.wav"
                s.cosy("say", text, "--voice", voice, "--no-play", "--out", str(out), timeout=180, check=True)
                audio, rate = read_wav(out)
                assert rate == 24000 and len(audio) == len(text) * SAMPLES_PER_BYTE
                assert float(np.abs(audio).max()) > 0.0  # sound, not a file of zeros

            log = (s.runtime_dir / "cv.log").read_text(errors="replace")
            warnings = [line for line in log.splitlines() if WARNING in line]
            assert len(warnings) == 1, log
            assert "WARNING" in warnings[0] and f"no space left on {disk} (tmpfs)" in warnings[0], warnings[0]
            assert "Traceback" not in log, log
            metrics = next(w for w in s.status()["workers"] if w["name"] == "cv")["metrics"]
            assert metrics["cache_write_failures"] == 2  # one per voice, at start: jobs write nothing
            assert metrics["voice_prompts_computed"] == 2 and metrics["voice_prompts_loaded"] == 0
            assert files_under(disk) == [".filler"]  # no partial or temporary cache file
        finally:
            s.stop()
