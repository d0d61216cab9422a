"""Voice cloning over the network with the real CosyVoice library on the generated tiny model, on the CPU.

A broker, a cosyvoice worker (the tiny model, its own voice folder with one voice) and `cosy http` with a
registry of its own that the worker never reads: a voice uploaded with `POST /v1/audio/voices` can only reach the
worker as the job's own prompt. It must be usable at once (no folder scan, no restart). The tiny model gives 20
speech tokens x 960 samples at 24 kHz per byte of text (its LLM never stops early).

Like the other CosyVoice tests this needs torch and the library (CI: .venv-cosyvoice); elsewhere it skips.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cosyvoice_env import needs_library
from stack import Stack

pytestmark = [needs_library, pytest.mark.timeout(900)]

SAMPLES_PER_BYTE = 20 * 960
RATE = 24_000


def reference_wav(seconds: float = 3.5, rate: int = 22050) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    audio = 0.3 * np.sin(2 * np.pi * (160 + 60 * t) * t) + 0.01 * np.random.default_rng(7).standard_normal(t.size)
    buf = io.BytesIO()
    sf.write(buf, audio.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, object, Path]]:
    from test_http_gateway import GatewayProcess
    from tiny_cosyvoice import make_voice

    root = tmp_path_factory.mktemp("cv-gateway")
    worker_voices, registry = root / "worker-voices", root / "registry"
    make_voice(worker_voices, "tiny")
    s = Stack(env={"COSY_VOICES_DIR": str(registry), "COSY_CONFIG": str(root / "none.toml")})
    try:
        s.start_broker()
        s.start_tiny_cosyvoice(root, worker_voices, timeout=300)
        gw = GatewayProcess(s, "http", ["--timeout", "300", "--no-split"]).start().wait_ready()
        yield s, gw, registry
    finally:
        s.stop()


def _speech(gw, body: dict):  # noqa: ANN001 - GatewayProcess
    import httpx

    return httpx.post(f"{gw.url}/v1/audio/speech", json=body, timeout=300)


def test_an_uploaded_voice_speaks_in_the_very_next_request(served) -> None:
    import httpx
    from test_http_gateway import decode

    stack, gw, registry = served
    worker = next(w for w in stack.status()["workers"] if w["name"] == "cv")
    assert worker["clone"] is True and worker["voices"] == ["tiny"]
    resp = httpx.post(f"{gw.url}/v1/audio/voices", data={"name": "guest", "transcript": "A reference of mine.",
                                                        "language": "en"},
                      files={"audio_sample": ("guest.wav", reference_wav(), "audio/wav")}, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["object"] == "audio.voice" and resp.json()["id"] == "guest"
    assert json.loads((registry / "guest" / "voice.json").read_text())["transcript"] == "A reference of mine."

    speech = _speech(gw, {"model": "tts-1", "input": "Hi", "voice": "guest", "response_format": "wav"})
    assert speech.status_code == 200, speech.text
    audio, rate = decode(speech.content)
    assert rate == RATE and len(audio) == len(b"Hi") * SAMPLES_PER_BYTE
    metrics = next(w for w in stack.status()["workers"] if w["name"] == "cv")["metrics"]
    assert metrics["prompt_features_computed"] == 1  # the job's own prompt, computed on the worker

    again = _speech(gw, {"model": "tts-1", "input": "Yo", "voice": {"id": "guest"}, "response_format": "pcm"})
    assert again.status_code == 200 and len(again.content) // 2 == len(b"Yo") * SAMPLES_PER_BYTE  # pcm: 24 kHz
    metrics = next(w for w in stack.status()["workers"] if w["name"] == "cv")["metrics"]
    assert metrics["prompt_features_computed"] == 1  # the same prompt: its features are reused


def test_instructions_go_to_the_instruct_mode(served) -> None:
    from test_http_gateway import decode

    _, gw, _ = served
    speech = _speech(gw, {"model": "gpt-4o-mini-tts", "input": "Ok", "voice": "tiny", "response_format": "wav",
                          "instructions": "Speak slowly."})
    assert speech.status_code == 200, speech.text
    audio, rate = decode(speech.content)
    assert rate == RATE and len(audio) == len(b"Ok") * SAMPLES_PER_BYTE
