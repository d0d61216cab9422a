"""The whole OpenAI speech surface of `cosy http`, driven as the clients in ../shared/notes/clients.md drive it.

Real processes: a broker, a Piper worker (voice joe, started first: the served default voice), a tone worker
(voice tone) and tests/echo_worker.py, a real worker whose tone engine clones (voice parrot) and records what
each job asked for, so instructions and per-request prompts are seen where they arrive. The gateway runs with an
API key, as Open WebUI is set up against a remote server.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stack import Stack, assert_prompt_without_aliasing, transcribe, wait_for
from test_http_gateway import (
    API_KEY,
    FOX,
    FOX_WORDS,
    TONE,
    TONE_RATE,
    GatewayProcess,
    assert_openai_error,
    curl,
    decode,
    decode_av,
)

pytest.importorskip("starlette")
pytest.importorskip("av")
httpx = pytest.importorskip("httpx")

from cosy.gateways.voice_names import OPENAI_VOICES  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
PARROT = "parrot"  # the echo worker's voice


def tone_samples(text: str, rate: int = TONE_RATE) -> int:
    return int(len(text) * TONE["ms_per_char"] / 1000 * rate)


def start_echo_worker(s: Stack, name: str, record: Path) -> None:
    log = open(s.runtime_dir / f"{name}.log", "ab")  # noqa: SIM115
    s.logs.append(Path(log.name))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "echo_worker.py"), "--runtime-dir",
                             str(s.runtime_dir), "--name", name, "--record", str(record)], env=s.env, stdout=log,
                            stderr=subprocess.STDOUT)
    s.procs.append(proc)
    s.workers[name] = proc
    s.wait_worker(name)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def record_of(path: Path, text: str) -> dict:
    return wait_for(lambda: next((r for r in records(path) if r["text"] == text), None), 10, f"the job {text!r}")


def voice_wav(seconds: float, rate: int = 22050, channels: int = 2) -> bytes:
    """A made-up reference recording: a gliding tone with a little noise, as a WAV file."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * (150 + 40 * t) * t) + 0.01 * np.random.default_rng(1).standard_normal(len(t))
    buf = io.BytesIO()
    sf.write(buf, np.stack([mono] * channels, axis=1), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


class Served:
    def __init__(self, stack: Stack, gw: GatewayProcess, record: Path, voices_dir: Path) -> None:
        self.stack, self.gw, self.record, self.voices_dir = stack, gw, record, voices_dir

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.gw.url}/v1", api_key=API_KEY, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(f"{self.gw.url}{path}", timeout=60, **kw)

    def speech(self, body: dict, headers: dict | None = AUTH) -> httpx.Response:
        return self.post("/v1/audio/speech", json=body, headers=headers)

    def upload(self, fields: dict, files: dict | None, headers: dict | None = AUTH) -> httpx.Response:
        return self.post("/v1/audio/voices", data=fields, files=files, headers=headers)

    def registry(self) -> list[str]:
        return sorted(p.name for p in self.voices_dir.iterdir()) if self.voices_dir.exists() else []


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("surface")
    voices_dir = tmp / "voices"
    s = Stack(env={"COSY_VOICES_DIR": str(voices_dir), "COSY_CONFIG": str(tmp / "none.toml")})
    try:
        s.start_broker()
        s.start_worker("piper", name="piper-0")
        s.start_worker("tone", name="tone-0", options=TONE)
        start_echo_worker(s, "echo-0", tmp / "echo.jsonl")
        gw = GatewayProcess(s, "http", ["--api-key", API_KEY]).start()
        wait_for(lambda: json.loads(curl(f"{gw.url}/readyz").stdout).get("workers") == 3, 20, "three workers")
        yield Served(s, gw, tmp / "echo.jsonl", voices_dir)
    finally:
        s.stop()


# --- voices: OpenAI's names, objects, aliases --------------------------------------------------------


def test_the_sdk_says_alloy_with_no_format_and_gets_mp3_of_real_speech(served: Served) -> None:
    resp = served.client().audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=FOX)
    assert resp.headers["content-type"] == "audio/mpeg"
    audio, rate = decode(resp.content)  # libsndfile reads the MP3
    assert rate == 22050 and 1.5 <= len(audio) / rate <= 6.0  # Piper's joe: the served default voice
    heard = set(transcribe(audio, rate).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


def test_voice_as_an_object_with_an_id(served: Served) -> None:
    resp = served.client().audio.speech.with_raw_response.create(
        model="tts-1", voice={"id": "tone"}, input="by object", response_format="wav")
    audio, rate = decode(resp.content)
    assert rate == TONE_RATE and len(audio) == tone_samples("by object")


@pytest.mark.parametrize("name", ["shimmer", "cedar"])
def test_every_openai_name_is_the_served_default_voice(served: Served, name: str) -> None:
    resp = served.speech({"input": "Hi.", "voice": name, "response_format": "wav"})
    assert resp.status_code == 200, resp.text
    audio, rate = decode(resp.content)
    assert rate == 22050  # Piper (joe); the tone voices are at 22050 Hz too, but far shorter
    assert len(audio) > tone_samples("Hi.") * 3


def test_a_name_that_is_nothing_is_404_listing_the_voices(served: Served) -> None:
    resp = served.speech({"input": "Hi.", "voice": "nobody"})
    assert resp.status_code == 404
    assert_openai_error(resp.json(), "voice_not_found")
    assert "joe" in resp.json()["error"]["message"] and "tone" in resp.json()["error"]["message"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_sdk_gets_all_six_formats(served: Served, fmt: str) -> None:
    text = "y" * 40  # 0.8 s of a 440 Hz tone at 22,050 Hz
    resp = served.client().audio.speech.with_raw_response.create(model="tts-1", voice="tone", input=text,
                                                                 response_format=fmt)
    rate = int(resp.headers["x-sample-rate"])
    if fmt == "pcm":
        assert rate == 24000
        audio = np.frombuffer(resp.content, dtype="<i2")
    else:
        audio, decoded_rate = decode_av(resp.content)  # FFmpeg decodes every container, as players do
        if fmt == "opus":  # FFmpeg's Opus decoder always gives 48 kHz, whatever the stream was encoded at
            assert decoded_rate == 48000
            rate = decoded_rate
        assert decoded_rate == rate
    expected = 0.8 * rate
    slack = 0.01 * rate if fmt in ("wav", "flac", "pcm") else 0.15 * rate
    assert abs(len(audio) - expected) <= slack, (fmt, len(audio), expected)
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float32)))
    assert abs(np.argmax(spectrum) * rate / len(audio) - 440) < 10


def test_aac_is_adts(served: Served) -> None:
    resp = served.speech({"input": "y" * 20, "voice": "tone", "response_format": "aac"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "audio/aac"
    assert resp.headers.get("transfer-encoding") == "chunked"
    data = resp.content
    assert data[:2] in (b"\xff\xf1", b"\xff\xf9")  # ADTS sync word, MPEG-4, no CRC / with CRC
    # Every frame: a 12-bit sync, then its length in 13 bits; walking them must land exactly on the end.
    pos = frames = 0
    while pos < len(data):
        assert data[pos] == 0xFF and data[pos + 1] & 0xF0 == 0xF0, pos
        pos += ((data[pos + 3] & 0x03) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        frames += 1
    assert pos == len(data) and frames >= 0.4 * TONE_RATE / 1024


# --- instructions ---------------------------------------------------------------------------------------


def test_instructions_reach_the_engine_as_the_jobs_instruct(served: Served) -> None:
    text = "Arr, a pirate line."
    resp = served.client().audio.speech.with_raw_response.create(
        model="gpt-4o-mini-tts", voice=PARROT, input=text, instructions="Speak like a pirate.",
        response_format="wav")
    assert len(decode(resp.content)[0]) == tone_samples(text)
    assert record_of(served.record, text)["instruct"] == "Speak like a pirate."


def test_an_engine_without_instruct_mode_ignores_instructions(served: Served) -> None:
    plain = served.speech({"input": "Same words.", "voice": "tone", "response_format": "pcm"})
    told = served.speech({"input": "Same words.", "voice": "tone", "response_format": "pcm",
                          "instructions": "Whisper it."})
    assert plain.status_code == told.status_code == 200
    assert told.content == plain.content and len(plain.content) > 0


def test_the_runtime_instruct_modes_take_a_worker_whose_ready_says_instruct(served: Served) -> None:
    """The echo worker's READY says instruct: /inference_instruct reaches it with the instruction; the tone
    worker's does not, so the same request for its voice is refused, naming the engines that follow one."""
    text = "Told how to say it."
    resp = served.post("/inference_instruct", data={"tts_text": text, "spk_id": PARROT, "instruct_text": "Slowly."},
                       headers=AUTH)
    assert resp.status_code == 200 and len(resp.content) > 0, resp.text
    assert record_of(served.record, text)["instruct"] == "Slowly."
    refused = served.post("/inference_instruct", data={"tts_text": "x", "spk_id": "tone", "instruct_text": "Slowly."},
                          headers=AUTH)
    assert refused.status_code == 400 and refused.json()["code"] == "NO_INSTRUCT_MODE"
    assert "engines that have one: echo" in refused.json()["detail"]


# --- SSE usage ------------------------------------------------------------------------------------


def test_sse_done_event_carries_usage(served: Served) -> None:
    text, instructions = "z" * 20, "calm"
    resp = served.speech({"input": text, "voice": "tone", "response_format": "pcm", "stream_format": "sse",
                          "instructions": instructions})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in resp.text.split("\n\n") if line.startswith("data: ")]
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    seconds = len(pcm) / 2 / 24000
    assert abs(seconds - 0.4) < 0.001
    # input: characters of input and instructions; output: audio in 40 ms units (25 a second).
    assert done["usage"] == {"input_tokens": 24, "output_tokens": 10, "total_tokens": 34}


# --- paths and listing -------------------------------------------------------------------------------


def test_bare_audio_speech_path_is_the_same_route(served: Served) -> None:
    resp = served.post("/audio/speech", json={"input": "bare path", "voice": "tone", "response_format": "wav"},
                       headers=AUTH)
    assert resp.status_code == 200
    assert len(decode(resp.content)[0]) == tone_samples("bare path")


def test_voices_list_the_aliases_with_what_they_resolve_to(served: Served) -> None:
    voices = httpx.get(f"{served.gw.url}/v1/audio/voices", timeout=30).json()["voices"]
    by_id = {v["id"]: v for v in voices}
    assert {"joe", "tone", PARROT} <= set(by_id)
    assert by_id["joe"]["default"] is True and by_id["joe"]["workers"] == ["piper-0"]
    for name in OPENAI_VOICES:
        assert by_id[name]["alias_of"] == "joe", name
    assert all(isinstance(v["name"], str) for v in voices)


def test_open_webui_flow_lists_without_a_key_then_speaks_with_one(served: Served) -> None:
    base = f"{served.gw.url}/v1"
    voices = httpx.get(f"{base}/audio/voices", timeout=30)  # no Authorization header, as Open WebUI sends
    models = httpx.get(f"{base}/audio/models", timeout=30)
    assert voices.status_code == 200 and models.status_code == 200
    assert "alloy" in [v["id"] for v in voices.json()["voices"]]
    assert {"tts-1", "tts-1-hd"} <= {m["id"] for m in models.json()["models"]}
    body = {"input": "Hello from Open WebUI.", "voice": "alloy", "model": "tts-1"}  # no response_format
    assert served.speech(body, headers=None).status_code == 401  # speech still needs the key
    resp = served.speech(body, headers=AUTH)
    assert resp.status_code == 200 and resp.headers["content-type"] == "audio/mpeg"
    audio, rate = decode(resp.content)
    assert rate == 22050 and len(audio) / rate > 0.5


def test_sillytavern_and_home_assistant_bodies(served: Served) -> None:
    # SillyTavern: the full URL, tts-1, an OpenAI name, mp3, a speed.
    st = served.speech({"input": "SillyTavern line.", "voice": "nova", "model": "tts-1", "response_format": "mp3",
                        "speed": 1.5})
    assert st.status_code == 200 and st.headers["content-type"] == "audio/mpeg"
    # Home Assistant's openai_tts: gpt-4o-mini-tts with instructions, plus whatever extra_payload adds.
    ha = served.speech({"input": "The lights are on.", "voice": "coral", "model": "gpt-4o-mini-tts",
                        "response_format": "mp3", "speed": 1.0, "instructions": "Cheerful.", "extra": True})
    assert ha.status_code == 200 and len(decode(ha.content)[0]) > 0


# --- voice upload -----------------------------------------------------------------------------------------


def test_an_uploaded_voice_is_used_by_the_very_next_request(served: Served) -> None:
    wav = voice_wav(4.0)
    resp = served.upload({"name": "newvoice", "transcript": "Hello there, this is my voice.", "consent": "cons_1"},
                         {"audio_sample": ("me.wav", wav, "audio/wav")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "audio.voice" and body["id"] == body["name"] == "newvoice"
    assert isinstance(body["created_at"], int) and body["created_at"] > 1_700_000_000
    text = "Cloned at once."
    speech = served.speech({"input": text, "voice": "newvoice", "response_format": "wav"})
    assert speech.status_code == 200, speech.text
    assert len(decode(speech.content)[0]) == tone_samples(text)  # the echo worker: the only one that clones
    job = record_of(served.record, text)
    assert abs(job["prompt_bytes"] - 4.0 * 16000 * 2) <= 4  # 16 kHz s16le of the 4 s reference
    assert job["prompt_text"] == "Hello there, this is my voice."
    # The same voice as the SDK's object, and listed with the served ones.
    again = served.client().audio.speech.with_raw_response.create(model="tts-1", voice={"id": "newvoice"},
                                                                  input="Once more.", response_format="wav")
    assert len(decode(again.content)[0]) == tone_samples("Once more.")
    assert record_of(served.record, "Once more.")["prompt_sha1"] == job["prompt_sha1"]
    listed = httpx.get(f"{served.gw.url}/v1/audio/voices", timeout=30).json()["voices"]
    assert {"id": "newvoice", "name": "newvoice", "registry": True} in listed
    meta = json.loads((served.voices_dir / "newvoice" / "voice.json").read_text())
    assert meta["transcript"] == "Hello there, this is my voice." and "cons_1" in meta["description"]


def test_a_voice_without_transcript_clones_cross_lingually(served: Served) -> None:
    resp = served.upload({"name": "wordless"}, {"audio_sample": ("w.wav", voice_wav(3.5), "audio/wav")})
    assert resp.status_code == 200, resp.text
    text = "No words given."
    assert served.speech({"input": text, "voice": "wordless", "response_format": "wav"}).status_code == 200
    job = record_of(served.record, text)
    assert job["prompt_text"] == "" and job["prompt_bytes"] == 3.5 * 16000 * 2


def test_a_registry_voice_becomes_a_16khz_prompt_without_aliasing(tmp_path: Path) -> None:
    """A registry voice (stored at 24 kHz) is the job's prompt through the same low-pass as the official routes'
    prompt_wav: its 10 kHz, above the prompt's 8 kHz Nyquist, does not fold onto 6 kHz."""
    import soundfile as sf

    from cosy.gateways import cloning
    from cosy.voices import Voice

    rate = 24000
    t = np.arange(3 * rate) / rate
    sf.write(str(tmp_path / "reference.wav"), 0.4 * np.sin(2 * np.pi * 1000 * t) + 0.4 * np.sin(2 * np.pi * 10000 * t),
             rate, subtype="PCM_16")
    voice = Voice(name="hiss", transcript="", language="", audio="reference.wav", sample_rate=rate, duration_s=3.0,
                  folder=str(tmp_path))
    out = assert_prompt_without_aliasing(cloning.prompt_audio(voice), 1000, 6000, "registry voice")
    assert len(out) == 3 * 16000


def _bad_uploads(tmp: Path) -> list[tuple[str, dict, dict | None, int, str]]:
    big = tmp / "big.wav"
    big.write_bytes(b"\0" * (17 << 20))
    return [
        ("oversized", {"name": "big"}, {"audio_sample": ("big.wav", big.read_bytes(), "audio/wav")}, 413,
         "request_too_large"),
        ("undecodable", {"name": "noise"}, {"audio_sample": ("x.wav", b"RIFF not really" * 100, "audio/wav")}, 400,
         "invalid_audio"),
        ("too short", {"name": "short"}, {"audio_sample": ("s.wav", voice_wav(1.0), "audio/wav")}, 400,
         "audio_too_short"),
        ("too long", {"name": "long"}, {"audio_sample": ("l.wav", voice_wav(31.0, rate=8000, channels=1),
                                                          "audio/wav")}, 400, "audio_too_long"),
        ("silent", {"name": "quiet"}, {"audio_sample": ("q.wav", _silence(4.0),
                                                         "audio/wav")}, 400, "silent_audio"),
        ("no name", {}, {"audio_sample": ("a.wav", voice_wav(4.0), "audio/wav")}, 400, "missing_required_parameter"),
        ("no audio", {"name": "nofile"}, None, 400, "missing_required_parameter"),
        ("bad name", {"name": "Bad Name!"}, {"audio_sample": ("a.wav", voice_wav(4.0), "audio/wav")}, 400,
         "invalid_voice_name"),
        ("served name", {"name": "joe"}, {"audio_sample": ("a.wav", voice_wav(4.0), "audio/wav")}, 409,
         "voice_exists"),
        ("openai name", {"name": "alloy"}, {"audio_sample": ("a.wav", voice_wav(4.0), "audio/wav")}, 409,
         "voice_exists"),
    ]


def _silence(seconds: float) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16000), dtype=np.int16), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_bad_uploads_get_clear_errors_store_nothing_and_the_gateway_keeps_serving(served: Served,
                                                                                  tmp_path: Path) -> None:
    before = served.registry()
    for what, fields, files, status, code in _bad_uploads(tmp_path):
        resp = served.upload(fields, files)
        assert resp.status_code == status, (what, resp.status_code, resp.text)
        assert_openai_error(resp.json(), code)
        assert served.registry() == before, what  # nothing half-written, no temporary folder left
    # JSON instead of a form, and no API key at all.
    not_a_form = served.post("/v1/audio/voices", json={"name": "x"}, headers=AUTH)
    assert not_a_form.status_code == 400 and not_a_form.json()["error"]["code"] == "invalid_form"
    assert served.upload({"name": "nokey"}, {"audio_sample": ("a.wav", voice_wav(4.0), "audio/wav")},
                         headers=None).status_code == 401
    assert served.registry() == before
    ok = served.speech({"input": "still here", "voice": "tone", "response_format": "wav"})
    assert ok.status_code == 200 and len(decode(ok.content)[0]) == tone_samples("still here")


def test_a_clashing_registry_name_is_409(served: Served) -> None:
    first = served.upload({"name": "twice", "transcript": "One."}, {"audio_sample": ("t.wav", voice_wav(3.2),
                                                                                     "audio/wav")})
    assert first.status_code == 200, first.text
    second = served.upload({"name": "twice", "transcript": "Two."}, {"audio_sample": ("t.wav", voice_wav(3.2),
                                                                                      "audio/wav")})
    assert second.status_code == 409
    assert_openai_error(second.json(), "voice_exists")
    meta = json.loads((served.voices_dir / "twice" / "voice.json").read_text())
    assert meta["transcript"] == "One."  # the first one stays as it was


# --- aliases from the config file and the command line -------------------------------------------------------


def test_configured_aliases_win_and_the_wildcard_takes_the_rest(served: Served, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[voice_aliases]\nalloy = "tone"\n"*" = "parrot"\n')
    gw = GatewayProcess(served.stack, "http", ["--voice-alias", "nova=joe", "--voice-alias", "tone=parrot"],
                        env={"COSY_CONFIG": str(config)}).start().wait_ready()
    try:
        def speak(voice: str, text: str) -> httpx.Response:
            resp = httpx.post(f"{gw.url}/v1/audio/speech", json={"input": text, "voice": voice,
                                                                 "response_format": "wav"}, timeout=60)
            assert resp.status_code == 200, resp.text
            return resp

        # alloy -> tone (config) -> parrot: an alias's target is not an alias again, but "tone" is served...
        speak("alloy", "alias from the file")
        assert "alias from the file" not in {r["text"] for r in records(served.record)}  # it went to tone-0
        speak("shimmer", "wildcard alias")
        assert record_of(served.record, "wildcard alias")["voice"] == PARROT
        nova = speak("nova", "command line alias")  # -> joe (Piper): far longer than the tone would be
        assert len(decode(nova.content)[0]) > 3 * tone_samples("command line alias")
        speak("tone", "alias over a served name")  # an explicit alias wins over the served voice "tone"
        assert record_of(served.record, "alias over a served name")["voice"] == PARROT
        listed = {v["id"]: v for v in httpx.get(f"{gw.url}/v1/audio/voices", timeout=30).json()["voices"]}
        assert listed["alloy"]["alias_of"] == "tone" and listed["shimmer"]["alias_of"] == PARROT
        assert listed["nova"]["alias_of"] == "joe" and listed["tone"]["alias_of"] == PARROT
    finally:
        gw.stop()


# --- a stack that cannot clone ---------------------------------------------------------------------------


def test_a_piper_and_tone_stack_says_which_engines_can_clone(tmp_path: Path) -> None:
    from cosy.voices import store_voice

    voices_dir = tmp_path / "voices"
    s = Stack(env={"COSY_VOICES_DIR": str(voices_dir)})
    try:
        s.start_broker()
        s.start_worker("piper", name="piper-0")
        s.start_worker("tone", name="tone-0", options=TONE)
        gw = GatewayProcess(s, "http", []).start().wait_ready()
        resp = httpx.post(f"{gw.url}/v1/audio/voices", data={"name": "mine", "transcript": "Words."},
                          files={"audio_sample": ("m.wav", voice_wav(4.0), "audio/wav")}, timeout=60)
        assert resp.status_code == 400
        assert_openai_error(resp.json(), "cannot_clone")
        assert "cosyvoice" in resp.json()["error"]["message"] and "piper" in resp.json()["error"]["message"]
        assert not voices_dir.exists() or not any(voices_dir.iterdir())
        # A registry voice that no worker serves: the broker refuses the job's own prompt, and says who could.
        import soundfile as sf

        audio, rate = sf.read(io.BytesIO(voice_wav(4.0, channels=1)), dtype="float32")
        store_voice("mine", audio, rate, "Words.", dest=voices_dir)
        speech = httpx.post(f"{gw.url}/v1/audio/speech", json={"input": "Hi.", "voice": "mine"}, timeout=60)
        assert speech.status_code == 400
        assert_openai_error(speech.json(), "cannot_clone")
        assert "cosyvoice" in speech.json()["error"]["message"]
    finally:
        s.stop()
