"""`cosy grpc` in front of a real CosyVoice worker (the generated tiny model, on the CPU): the official runtime's
zero-shot and cross-lingual requests bring their own prompt audio, and the worker computes the prompt's features
once for two requests with the same prompt (its heartbeat counters, read with `cosy status --json`).

Like tests/test_cosyvoice_engine.py this needs torch and the CosyVoice library in the running interpreter (CI:
.venv-cosyvoice); elsewhere it skips. The tiny model makes 20 speech tokens per byte of text, 960 samples each at
24 kHz.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from cosyvoice_env import needs_library
from stack import Stack, wait_for

pytestmark = needs_library

RATE = 24000
SAMPLES_PER_BYTE = 20 * 960


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Any, Any, Any]]:
    """A broker, a cosyvoice worker on the tiny model (voice tiny), `cosy grpc`, and the official client's stubs."""
    from grpc_stubs import generate_client
    from test_grpc_gateway import GrpcProcess
    from tiny_cosyvoice import make_voice

    root = tmp_path_factory.mktemp("cosyvoice-grpc")
    voices = root / "voices"
    make_voice(voices, "tiny")
    pb, pbg = generate_client(root / "stubs")
    s = Stack()
    try:
        s.start_broker()
        s.start_tiny_cosyvoice(root, voices, timeout=150)
        yield s, GrpcProcess(s).start().wait_serving(), pb, pbg
    finally:
        s.stop()


def official_prompt(seconds: float = 1.5) -> bytes:
    """What the official client sends: the prompt wav at 16 kHz as int16 bytes (here a chirp with a little noise)."""
    t = np.arange(int(seconds * 16000)) / 16000
    rng = np.random.default_rng(7)
    x = 0.3 * np.sin(2 * np.pi * (150 + 100 * t) * t) + 0.01 * rng.standard_normal(t.size)
    return (x * 2**15).astype(np.int16).tobytes()


def speak(gw: Any, pbg: Any, request: Any) -> tuple[np.ndarray, int]:
    call = pbg.CosyVoiceStub(gw.channel).Inference(request, timeout=180)
    audio = b"".join(r.tts_audio for r in call)
    return np.frombuffer(audio, dtype="<i2"), int(dict(call.initial_metadata())["x-sample-rate"])


def counters(s: Stack) -> dict[str, Any]:
    return next(w for w in s.status()["workers"] if w["name"] == "cv")["metrics"]


def test_zero_shot_with_its_own_prompt_computes_the_features_once(served) -> None:
    s, gw, pb, pbg = served
    prompt = official_prompt()
    before = counters(s)
    for text in ("Ok", "Hi"):
        request = pb.Request(zero_shot_request=pb.zeroshotRequest(tts_text=text, prompt_text="Its own words.",
                                                                  prompt_audio=prompt))
        audio, rate = speak(gw, pbg, request)
        assert rate == RATE and len(audio) == len(text) * SAMPLES_PER_BYTE
        assert np.abs(audio).max() > 0
    wait_for(lambda: counters(s)["prompt_features_reused"] == before["prompt_features_reused"] + 1, 10,
             "the heartbeat to count the reuse")
    after = counters(s)
    assert after["prompt_features_computed"] == before["prompt_features_computed"] + 1  # once for both requests


def test_cross_lingual_sft_and_instruct_reach_the_engine(served) -> None:
    s, gw, pb, pbg = served
    computed = counters(s)["prompt_features_computed"]
    requests = {
        "cross_lingual": pb.Request(cross_lingual_request=pb.crosslingualRequest(tts_text="Yo",
                                                                                 prompt_audio=official_prompt(2.0))),
        "sft": pb.Request(sft_request=pb.sftRequest(spk_id="tiny", tts_text="Hey")),
        "instruct": pb.Request(instruct_request=pb.instructRequest(tts_text="Hey", spk_id="tiny",
                                                                   instruct_text="Speak slowly.")),
    }
    lengths = {}
    for mode, request in requests.items():
        audio, rate = speak(gw, pbg, request)
        assert rate == RATE, mode
        lengths[mode] = len(audio)
    assert lengths == {"cross_lingual": 2 * SAMPLES_PER_BYTE, "sft": 3 * SAMPLES_PER_BYTE,
                       "instruct": 3 * SAMPLES_PER_BYTE}
    wait_for(lambda: counters(s)["prompt_features_computed"] == computed + 1, 10, "the cross-lingual prompt counted")


def test_the_status_call_shows_the_cloning_worker(served) -> None:
    _s, gw, _pb, _pbg = served
    (worker,) = gw.status().workers
    assert worker.engine == "cosyvoice" and worker.clone and list(worker.voices) == ["tiny"]
    assert worker.sample_rate == RATE
    if worker.device == "cpu":
        assert worker.WhichOneof("accelerator") == "no_gpu"
    else:  # a GPU machine: NVML's figures
        assert worker.gpu.memory_total_mb > 0
