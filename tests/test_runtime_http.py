"""`cosy http` answers the official CosyVoice runtime's FastAPI routes (/inference_sft ... /inference_instruct2).

Plain HTTP form posts (curl, and httpx sending a GET with a multipart body as the official client does) against a
real broker, a Piper worker, a tone worker and the gateway, all processes. The tone engine's length rule makes the
expected PCM length exact.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stack import Stack, assert_prompt_without_aliasing, transcribe, wait_for
from test_http_gateway import (
    FOX,
    FOX_WORDS,
    PIPER_AND_TONE,
    TONE,
    TONE_RATE,
    ChunkObserver,
    GatewayProcess,
    curl,
    gateway_with_workers,
)

from cosy import protocol as P

pytest.importorskip("starlette")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

API_KEY = "rt-key-123"


def tone_samples(text: str) -> int:
    """The tone engine's length rule (workers/engines/tone.py): ms_per_char of audio per character."""
    return max(1, int(len(text) * TONE["ms_per_char"] / 1000 * TONE_RATE))


def wav(seconds: float, rate: int = 24000, channels: int = 1, freq: float = 190.0, fmt: str = "WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.stack([mono] * channels, axis=1), rate, format=fmt)
    return buf.getvalue()


def post(gw: GatewayProcess, route: str, data: dict[str, str], upload: bytes | None = None, method: str = "POST",
         headers: dict[str, str] | None = None) -> httpx.Response:
    files = {"prompt_wav": ("prompt_wav", upload, "application/octet-stream")} if upload is not None else None
    with httpx.Client(timeout=60) as client:
        return client.request(method, f"{gw.url}{route}", data=data, files=files, headers=headers)


def pcm(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["x-sample-format"] == "s16le" and resp.headers["x-channels"] == "1"
    assert len(resp.content) % 2 == 0 and not resp.content.startswith(b"RIFF")
    return np.frombuffer(resp.content, dtype="<i2")


def error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert body["code"] == code and isinstance(body["detail"], str) and body["detail"], body
    return body


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Stack, GatewayProcess]]:
    """A broker with a Piper worker (voice joe) and a tone worker (voice tone), and `cosy http`."""
    s = Stack()
    try:
        yield s, gateway_with_workers(s, "http", PIPER_AND_TONE).wait_ready()
    finally:
        s.stop()


# --- audio --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_sft_streams_pcm_of_the_expected_length(served, method: str) -> None:
    _, gw = served
    text = "y" * 40  # 0.8 s of a 440 Hz tone
    resp = post(gw, "/inference_sft", {"tts_text": text, "spk_id": "tone"}, method=method)
    audio = pcm(resp)
    assert int(resp.headers["x-sample-rate"]) == TONE_RATE and len(audio) == tone_samples(text)
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float32)))
    assert abs(np.argmax(spectrum) * TONE_RATE / len(audio) - 440) < 10


def test_sft_with_curl_form_fields_is_real_speech(served) -> None:
    _, gw = served
    out = curl("-D", "-", "-F", f"tts_text={FOX}", "-F", "spk_id=joe", f"{gw.url}/inference_sft")
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"transfer-encoding: chunked" in head.lower()
    audio = np.frombuffer(body, dtype="<i2")
    assert 1.5 <= len(audio) / 22050 <= 6.0
    heard = set(transcribe(audio, 22050).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


def test_the_first_bytes_come_before_the_last_chunk_is_made(served) -> None:
    stack, gw = served
    observer = ChunkObserver(stack)
    try:
        text = "x" * 150  # 3 s in 30 chunks of 100 ms, one every 100 ms: slack for a loaded machine
        with httpx.Client(timeout=60) as client, client.stream(
                "GET", f"{gw.url}/inference_sft", data={"tts_text": text, "spk_id": "tone"}) as resp:
            job = resp.headers["x-cosy-job"]
            chunks = resp.iter_bytes()
            first = next(chunks)
            t_first = time.monotonic()
            body = first + b"".join(chunks)
        t_final, final = wait_for(lambda: observer.final(job), 10, "the job's final chunk")
        assert first and t_first < t_final
        assert len(body) // 2 == final.total_samples == tone_samples(text)
    finally:
        observer.close()


def test_a_client_that_goes_away_cancels_the_job(served) -> None:
    stack, gw = served
    before = stack.status()["counters"]
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", f"{gw.url}/inference_sft", data={"tts_text": "v" * 500, "spk_id": "tone"}) as resp:  # 10 s
        assert resp.status_code == 200
        next(resp.iter_bytes())
    wait_for(lambda: stack.status()["counters"]["cancelled"] > before["cancelled"], 15, "the job to be cancelled")
    assert stack.status()["counters"]["done"] == before["done"]


def test_query_string_fields_work_for_a_bare_get(served) -> None:
    _, gw = served
    text = "hello from a url"
    resp = httpx.get(f"{gw.url}/inference_sft", params={"tts_text": text, "spk_id": "tone"}, timeout=60)
    assert len(pcm(resp)) == tone_samples(text)


# --- modes the stack cannot do -----------------------------------------------------------------------


@pytest.mark.parametrize("route, data", [
    ("/inference_zero_shot", {"tts_text": "Hello.", "prompt_text": "The words of the prompt."}),
    ("/inference_cross_lingual", {"tts_text": "Hello."}),
    ("/inference_instruct2", {"tts_text": "Hello.", "instruct_text": "Speak slowly."}),
])
def test_prompt_routes_without_a_cloning_worker_name_cosyvoice(served, route: str, data: dict) -> None:
    _, gw = served
    body = error(post(gw, route, data, wav(2.0, 44100, channels=2)), 400, P.CANNOT_CLONE)
    assert "cosyvoice" in body["detail"]


def test_instruct_for_a_voice_without_instruct_mode_is_400(served) -> None:
    _, gw = served
    body = error(post(gw, "/inference_instruct", {"tts_text": "Hi.", "spk_id": "joe", "instruct_text": "Whisper."}),
                 400, "NO_INSTRUCT_MODE")
    assert "piper" in body["detail"] and "cosyvoice" in body["detail"]


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input_on_every_route_is_a_clear_error_and_the_gateway_keeps_serving(served) -> None:
    _, gw = served
    zs = {"tts_text": "Hi.", "prompt_text": "Its words."}
    # oversized upload: refused before it is read
    error(post(gw, "/inference_cross_lingual", {"tts_text": "Hi."}, b"\0" * (17 << 20)), 413, "REQUEST_TOO_LARGE")
    # undecodable audio
    for route, data in (("/inference_zero_shot", zs), ("/inference_cross_lingual", {"tts_text": "Hi."}),
                        ("/inference_instruct2", {"tts_text": "Hi.", "instruct_text": "Calm."})):
        body = error(post(gw, route, data, b"this is not audio" * 64), 400, "BAD_AUDIO")
        assert "decoded" in body["detail"] and "0x" not in body["detail"]
    # a prompt too long, too short, silent, or not a file
    assert "31.00 s" in error(post(gw, "/inference_zero_shot", zs, wav(31)), 400, "BAD_PROMPT")["detail"]
    error(post(gw, "/inference_zero_shot", zs, wav(0.2)), 400, "BAD_PROMPT")
    assert "silent" in error(post(gw, "/inference_zero_shot", zs, wav(2, freq=0)), 400, "BAD_PROMPT")["detail"]
    error(post(gw, "/inference_zero_shot", {**zs, "prompt_wav": "not a file"}), 400, "BAD_FORM")
    # zero-shot without the prompt's words
    error(post(gw, "/inference_zero_shot", {**zs, "prompt_text": " "}, wav(2)), 400, "NO_PROMPT_TEXT")
    # unknown spk_id: 404 that lists the voices
    for route, data in (("/inference_sft", {"tts_text": "Hi.", "spk_id": "alloy"}),
                        ("/inference_instruct", {"tts_text": "Hi.", "spk_id": "alloy", "instruct_text": "Calm."})):
        body = error(post(gw, route, data), 404, P.UNKNOWN_VOICE)
        assert sorted(body["voices"]) == ["joe", "tone"] and "joe" in body["detail"]
    # empty or over-long text
    error(post(gw, "/inference_sft", {"tts_text": "  ", "spk_id": "tone"}), 400, "EMPTY_TEXT")
    error(post(gw, "/inference_sft", {"tts_text": "a" * (P.MAX_TEXT_CHARS + 1), "spk_id": "tone"}), 400,
          P.TEXT_TOO_LONG)
    # a broken multipart body
    resp = httpx.post(f"{gw.url}/inference_sft", content=b"--x\r\nnot a part", timeout=30,
                      headers={"content-type": "multipart/form-data; boundary=x"})
    assert resp.status_code in (400, 422), resp.text
    text = "still serving"
    assert len(pcm(post(gw, "/inference_sft", {"tts_text": text, "spk_id": "tone"}))) == tone_samples(text)


@pytest.mark.parametrize("route, fields", [
    ("/inference_sft", ["tts_text", "spk_id"]),
    ("/inference_zero_shot", ["tts_text", "prompt_text", "prompt_wav"]),
    ("/inference_cross_lingual", ["tts_text", "prompt_wav"]),
    ("/inference_instruct", ["tts_text", "spk_id", "instruct_text"]),
    ("/inference_instruct2", ["tts_text", "instruct_text", "prompt_wav"]),
])
def test_a_missing_form_field_is_422_in_fastapis_shape(served, route: str, fields: list[str]) -> None:
    _, gw = served
    for missing in fields:
        data = {f: "x" for f in fields if f not in (missing, "prompt_wav")}
        upload = wav(1) if "prompt_wav" in fields and missing != "prompt_wav" else None
        resp = post(gw, route, data, upload)
        assert resp.status_code == 422, (route, missing, resp.text)
        assert resp.json()["detail"] == [{"type": "missing", "loc": ["body", missing], "msg": "Field required",
                                          "input": None}]


def test_the_routes_want_the_api_key_when_there_is_one(bare_stack: Stack) -> None:
    s = bare_stack
    gw = gateway_with_workers(s, "http", {"tone-0": ("tone", TONE)}, ["--api-key", API_KEY]).wait_ready()
    data = {"tts_text": "keyed", "spk_id": "tone"}
    error(post(gw, "/inference_sft", data), 401, "INVALID_API_KEY")
    error(post(gw, "/inference_sft", data, headers={"Authorization": "Bearer wrong"}), 401, "INVALID_API_KEY")
    resp = post(gw, "/inference_sft", data, headers={"Authorization": f"Bearer {API_KEY}"})
    assert len(pcm(resp)) == tone_samples("keyed")


def test_no_workers_is_503_with_retry_after(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker()
    gw = GatewayProcess(s, "http", []).start()
    resp = post(gw, "/inference_sft", {"tts_text": "Hi.", "spk_id": "tone"})
    error(resp, 503, "NO_WORKERS")
    assert int(resp.headers["retry-after"]) >= 1


# --- the prompt's conversion ------------------------------------------------------------------------


def test_an_upload_becomes_16khz_mono_s16le_without_aliasing() -> None:
    from cosy.gateways.runtime_http import prompt_pcm

    rate = 48000
    t = np.arange(2 * rate) / rate
    voice = 0.4 * np.sin(2 * np.pi * 1000 * t)  # stays
    above = 0.4 * np.sin(2 * np.pi * 12000 * t)  # above 8 kHz: would fold onto 4 kHz without the low-pass
    stereo = np.stack([voice + above, voice - above], axis=1)  # the 12 kHz cancels in the mix, not the 1 kHz
    import soundfile as sf

    for audio, label in ((stereo, "stereo"), (np.stack([voice + above], axis=1), "mono")):
        buf = io.BytesIO()
        sf.write(buf, audio.astype(np.float32), rate, format="FLAC")
        out = assert_prompt_without_aliasing(prompt_pcm(buf.getvalue()), 1000, 4000, label)  # 12 kHz folds to 4
        assert len(out) == 2 * P.PROMPT_RATE, label
    exact = np.frombuffer(prompt_pcm(wav(1.0, rate=P.PROMPT_RATE)), dtype="<i2")
    t16 = np.arange(P.PROMPT_RATE) / P.PROMPT_RATE
    assert np.abs(exact - 0.3 * 32767 * np.sin(2 * np.pi * 190 * t16)).max() <= 2  # 16 kHz: only requantised


def test_the_routes_are_documented() -> None:
    """docs/grpc.md names every route and RPC this gateway serves."""
    from cosy.gateways.runtime_http import ROUTES

    doc = (Path(__file__).resolve().parents[1] / "docs" / "grpc.md").read_text()
    for route in ROUTES:
        assert route in doc, route
    for name in ("cosyvoice.CosyVoice/Inference", "grpc.health.v1.Health", "cosy.Status/Get"):
        assert name in doc, name
