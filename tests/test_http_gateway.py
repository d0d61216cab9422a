"""`cosy http`: the OpenAI speech API, driven by clients nobody here wrote (the `openai` SDK, curl).

A real broker, real workers (Piper for speech, the tone engine for timing) and the gateway run
as processes. Streaming is proven with timestamps: an independent ZeroMQ subscriber on the
broker's audio socket sees when each chunk of the job goes by, and the HTTP client's first
bytes must come before the job's final chunk does.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zmq
from stack import Stack, transcribe, wait_for

from cosy import protocol as P
from cosy.endpoints import free_tcp_base
from cosy.segments import split_text

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

FOX = "The quick brown fox jumps over the lazy dog."
FOX_WORDS = {"quick", "brown", "fox", "jumps", "over", "lazy", "dog"}
TONE = {"voices": "tone", "delay_ms": 100, "chunk_ms": 100, "ms_per_char": 20, "capacity": 4}
TONE_RATE = 22050
# 3 s of audio in 30 chunks, one every 100 ms: the worker is still producing for seconds after a streaming
# gateway's first bytes, even on a loaded machine, while a buffering one can only answer after its last chunk.
LONG_TONE_TEXT = "x" * 150
API_KEY = "test-key-123"

COSY = (sys.executable, "-m", "cosy")  # the real command, as users run it


def free_port() -> int:
    return free_tcp_base(n=1)


@dataclass
class GatewayProcess:
    """A gateway (`cosy http` or `cosy wyoming`) as a process, stopped by PID."""

    stack: Stack
    command: str
    args: list[str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    env: dict[str, str] | None = None  # added to the stack's environment

    def start(self, wait: bool = True) -> GatewayProcess:
        where = (["--port", str(self.port)] if self.command == "http"
                 else ["--uri", f"tcp://127.0.0.1:{self.port}"])
        log = open(self.stack.runtime_dir / f"{self.command}-{self.port}.log", "ab")  # noqa: SIM115
        self.stack.logs.append(Path(log.name))
        self.proc = subprocess.Popen([*COSY, self.command, *where, "--runtime-dir",
                                      str(self.stack.runtime_dir), *self.args],
                                     env={**self.stack.env, **(self.env or {})}, stdout=log,
                                     stderr=subprocess.STDOUT)
        self.stack.procs.append(self.proc)  # the stack stops it too, whatever happens
        if wait:
            wait_for(self._listening, 30, f"cosy {self.command} on port {self.port}")
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"cosy {self.command} exited with {self.proc.returncode}:\n{self.stack.log_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> GatewayProcess:
        """`cosy http`: until /readyz says the broker and its workers are there."""
        wait_for(lambda: curl(f"{self.url}/readyz").stdout.startswith(b'{"ready":true'), 20, "the gateway ready")
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


Workers = dict[str, tuple[str, dict | None]]  # worker name -> (engine, options)
PIPER_AND_TONE: Workers = {"piper-0": ("piper", None), "tone-0": ("tone", TONE)}


def two_tones(options: dict) -> Workers:
    return {name: ("tone", options) for name in ("tone-a", "tone-b")}


def gateway_with_workers(s: Stack, command: str, workers: Workers, args: list[str] | None = None) -> GatewayProcess:
    """A broker, these workers and a gateway (`http` or `wyoming`), in stack s."""
    s.start_broker()
    for name, (engine, options) in workers.items():
        s.start_worker(engine, name=name, options=options)
    return GatewayProcess(s, command, args or []).start()


class ChunkObserver:
    """An independent subscriber to every audio chunk the broker forwards, with arrival times."""

    def __init__(self, stack: Stack) -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(stack.endpoints.audio_out)
        self.seen: list[tuple[float, P.ChunkHeader]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sub.poll(50):
                frames = self.sub.recv_multipart()
                t = time.monotonic()
                if len(frames) == 3:
                    self.seen.append((t, P.ChunkHeader.unpack(frames[1])))

    def chunks(self, job: str) -> list[tuple[float, P.ChunkHeader]]:
        return [(t, h) for t, h in list(self.seen) if h.job == job]

    def final(self, job: str) -> tuple[float, P.ChunkHeader] | None:
        return next(((t, h) for t, h in self.chunks(job) if h.final), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sub.close(linger=0)
        self.ctx.term()


def decode_av(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a container with FFmpeg (PyAV): what players of aac (and every other format) use."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
        rate = stream.rate
    audio = np.concatenate(frames)
    if audio.dtype != np.int16:  # planar float from the aac and opus decoders
        audio = np.clip(np.rint(audio * 32767), -32768, 32767).astype(np.int16)
    return audio, rate


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a streamed container with soundfile (libsndfile); aac (ADTS), which libsndfile lacks, with PyAV.

    A streamed FLAC says "length unknown" (its STREAMINFO cannot be patched after the bytes
    left), which soundfile's read() cannot size; libsndfile itself reads it to the end.
    """
    import soundfile as sf

    if data[:2] in (b"\xff\xf1", b"\xff\xf9"):  # an ADTS sync word: AAC
        return decode_av(data)
    with sf.SoundFile(io.BytesIO(data)) as f:
        if f.frames < 1 << 40:
            return f.read(dtype="int16"), f.samplerate
        parts = []
        buf = np.empty(8192, dtype=np.int16)
        while True:
            n = sf._snd.sf_readf_short(f._file, sf._ffi.cast("short *", buf.ctypes.data), len(buf))
            if n <= 0:
                break
            parts.append(buf[:n].copy())
        return np.concatenate(parts), f.samplerate


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)


def speech_curl(gw: GatewayProcess, body: dict, *extra: str) -> tuple[int, dict[str, str], bytes]:
    """POST /v1/audio/speech with curl; returns (status, headers, body)."""
    out = curl("-D", "-", "-H", "Content-Type: application/json", "-d", json.dumps(body), *extra,
               f"{gw.url}/v1/audio/speech")
    assert out.returncode == 0, out.stderr.decode()
    head, _, payload = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, payload


def busy(status: dict) -> tuple[int, int]:
    """(running, queued interactive) from the broker's status."""
    return status["running"], status["queue"].get("interactive", 0)


def openai_client(gw: GatewayProcess, api_key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, timeout=60, **kw)


def assert_openai_error(body: dict, code: str) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == code and isinstance(err["message"], str) and err["message"]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Stack, GatewayProcess]]:
    """A broker with a Piper worker (voice joe) and a slow tone worker (voice tone), and `cosy http`."""
    s = Stack()
    try:
        gw = gateway_with_workers(s, "http", PIPER_AND_TONE).wait_ready()
        yield s, gw
    finally:
        s.stop()


@pytest.fixture(scope="module")
def observer(served: tuple[Stack, GatewayProcess]) -> Iterator[ChunkObserver]:
    stack, gw = served
    obs = ChunkObserver(stack)
    try:
        # Prove the subscription is live before anyone relies on it: the observer must see a job end.
        client = openai_client(gw)
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="tone", input="warm up", response_format="pcm") as resp:
            job = resp.headers["x-cosy-job"]
            resp.read()
        wait_for(lambda: obs.final(job), 10, "the observer to see a whole job")
        yield obs
    finally:
        obs.close()


# --- the openai SDK --------------------------------------------------------------------------------


def test_openai_sdk_writes_a_wav_of_real_speech(served, tmp_path: Path) -> None:
    import soundfile as sf

    _, gw = served
    out = tmp_path / "fox.wav"
    with openai_client(gw).audio.speech.with_streaming_response.create(
            model="tts-1", voice="joe", input=FOX, response_format="wav") as resp:
        assert resp.headers["content-type"] == "audio/wav"
        assert resp.headers.get("transfer-encoding") == "chunked"
        resp.stream_to_file(out)
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 22050
    assert 1.5 <= len(audio) / rate <= 6.0
    heard = set(transcribe(audio, rate).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


def test_openai_sdk_pcm_is_raw_16bit_at_24khz(served) -> None:
    import soundfile as sf

    _, gw = served
    with openai_client(gw).audio.speech.with_streaming_response.create(
            model="tts-1", voice="joe", input=FOX, response_format="pcm") as resp:
        assert resp.headers["content-type"] == "audio/pcm"
        assert resp.headers["x-sample-rate"] == "24000"
        assert resp.headers["x-sample-format"] == "s16le"
        data = b"".join(resp.iter_bytes())
    assert not data.startswith(b"RIFF") and len(data) % 2 == 0
    audio, rate = sf.read(io.BytesIO(data), format="RAW", subtype="PCM_16", endian="LITTLE", samplerate=24000,
                          channels=1, dtype="int16")
    assert 1.5 <= len(audio) / rate <= 6.0
    heard = set(transcribe(audio, rate).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


def test_first_bytes_arrive_before_the_final_chunk_is_produced(served, observer: ChunkObserver) -> None:
    _, gw = served
    t_first = None
    with openai_client(gw).audio.speech.with_streaming_response.create(
            model="tts-1", voice="tone", input=LONG_TONE_TEXT, response_format="wav") as resp:
        job = resp.headers["x-cosy-job"]
        data = b""
        for part in resp.iter_bytes():
            if part and t_first is None:
                t_first = time.monotonic()
            data += part
    assert t_first is not None
    t_final, final = wait_for(lambda: observer.final(job), 10, "the job's final chunk")
    chunks = observer.chunks(job)
    before = [h.seq for t, h in chunks if t <= t_first]
    # The worker made its last chunk after the client had its first bytes: the gateway streamed them.
    assert t_first < t_final, (t_first, t_final)
    assert len(before) < final.total_chunks, f"all {final.total_chunks} chunks were made before the first bytes"
    assert final.total_samples == 3 * TONE_RATE  # 3 s: 30 chunks of audio (and the worker's end marker)
    audio, rate = decode(data)
    assert rate == TONE_RATE and len(audio) == final.total_samples


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus", "aac", "pcm"])
def test_curl_streams_every_format_and_soundfile_decodes_it(served, fmt: str) -> None:
    import soundfile as sf

    _, gw = served
    text = "y" * 40  # 0.8 s of a 440 Hz tone
    status, headers, data = speech_curl(gw, {"model": "tts-1", "input": text, "voice": "tone",
                                             "response_format": fmt})
    assert status == 200, data[:300]
    assert headers.get("transfer-encoding") == "chunked"
    if fmt == "pcm":
        audio, rate = sf.read(io.BytesIO(data), format="RAW", subtype="PCM_16", samplerate=24000, channels=1,
                              dtype="int16")
    else:
        audio, rate = decode(data)
    assert rate == int(headers["x-sample-rate"])
    expected = 0.8 * rate
    slack = 0.01 * rate if fmt in ("wav", "flac", "pcm") else 0.15 * rate  # mp3/opus/aac add codec delay
    assert abs(len(audio) - expected) <= slack, (fmt, len(audio), expected)
    # It is the tone: most energy at 440 Hz.
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float32)))
    peak_hz = np.argmax(spectrum) * rate / len(audio)
    assert abs(peak_hz - 440) < 10, peak_hz


def test_sse_stream_format_carries_base64_pcm(served) -> None:
    import base64

    _, gw = served
    status, headers, data = speech_curl(gw, {"input": "z" * 20, "voice": "tone", "response_format": "pcm",
                                             "stream_format": "sse"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len(b"data: "):]) for line in data.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
    assert abs(len(pcm) // 2 - 0.4 * 24000) <= 2


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_voice_is_404_in_openai_shape(served) -> None:
    import openai

    _, gw = served
    with pytest.raises(openai.NotFoundError) as info:
        openai_client(gw, max_retries=0).audio.speech.create(model="tts-1", voice="nobody", input="Hello.")
    assert info.value.status_code == 404
    assert_openai_error(info.value.response.json(), "voice_not_found")
    assert "joe" in info.value.response.json()["error"]["message"]


@pytest.mark.parametrize("body, code", [
    ({"model": "tts-1", "voice": "joe", "input": ""}, "empty_input"),
    ({"model": "tts-1", "voice": "joe", "input": "   \n"}, "empty_input"),
    ({"model": "tts-1", "voice": "joe"}, "missing_required_parameter"),
    ({"model": "tts-1", "voice": "joe", "input": "hi", "speed": 9}, "invalid_speed"),
    ({"model": "tts-1", "voice": "joe", "input": "hi", "response_format": "m4a"}, "unsupported_response_format"),
    ({"model": "tts-1", "voice": 7, "input": "hi"}, "invalid_type"),
    ({"model": "tts-1", "voice": {"name": "joe"}, "input": "hi"}, "invalid_type"),
    ({"model": "tts-1", "voice": "joe", "input": "hi", "instructions": "x" * 4097}, "string_above_max_length"),
    ({"model": "tts-1", "voice": "joe", "input": "x" * (P.MAX_TEXT_CHARS + 1)}, "string_above_max_length"),
])
def test_bad_input_is_400(served, body: dict, code: str) -> None:
    _, gw = served
    status, _, data = speech_curl(gw, body)
    assert status == 400
    assert_openai_error(json.loads(data), code)


def test_empty_input_is_400_for_the_sdk_too(served) -> None:
    import openai

    _, gw = served
    with pytest.raises(openai.BadRequestError) as info:
        openai_client(gw, max_retries=0).audio.speech.create(model="tts-1", voice="joe", input="")
    assert_openai_error(info.value.response.json(), "empty_input")


def test_invalid_json_is_400(served) -> None:
    _, gw = served
    out = curl("-w", "%{http_code}", "-o", "/dev/null", "-d", "{not json", f"{gw.url}/v1/audio/speech")
    assert out.stdout == b"400"


def test_full_queue_is_503_with_retry_after(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker("--max-queue", "1")
    s.start_worker("tone", options={**TONE, "capacity": 1, "delay_ms": 200})
    gw = GatewayProcess(s, "http", []).start()
    body = json.dumps({"input": "w" * 200, "voice": "tone", "response_format": "pcm"})
    # Two slow jobs: one runs (capacity 1), one waits (the queue holds 1).
    holders = []
    try:
        # One at a time: the first must be running before the second queues (the queue holds only 1).
        for want in ((1, 0), (1, 1)):
            holders.append(subprocess.Popen(["curl", "-sS", "-N", "-o", "/dev/null", "-d", body,
                                             f"{gw.url}/v1/audio/speech"]))
            wait_for(lambda want=want: busy(s.status()) == want, 20, f"running/queued = {want}")
        status, headers, data = speech_curl(gw, {"input": "Hello.", "voice": "tone"})
        assert status == 503
        assert int(headers["retry-after"]) >= 1
        assert_openai_error(json.loads(data), "queue_full")
    finally:
        for h in holders:
            h.terminate()
            h.wait(10)
    # Both held jobs were cancelled when curl went away.
    wait_for(lambda: busy(s.status()) == (0, 0), 20, "the cut requests' jobs to be cancelled")


def test_client_disconnect_cancels_the_job(served, observer: ChunkObserver) -> None:
    import httpx

    stack, gw = served
    before = stack.status()["counters"]
    text = "v" * 500  # 10 s of audio, 100 chunks, 10 s to make
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{gw.url}/v1/audio/speech", json={"input": text, "voice": "tone", "response_format": "wav"}
    ) as resp:
        assert resp.status_code == 200
        job = resp.headers["x-cosy-job"]
        next(resp.iter_bytes())
    # The connection is closed: the job must be cancelled, not rendered to nobody.
    wait_for(lambda: stack.status()["counters"]["cancelled"] > before["cancelled"], 15, "the job to be cancelled")
    after = stack.status()
    assert after["counters"]["done"] == before["done"]
    assert observer.final(job) is None
    assert len(observer.chunks(job)) < 100


FAST_TONE = {**TONE, "delay_ms": 20}  # 100 ms of audio every 20 ms: 5x real time
LONG_TEXT = ("This first sentence starts the reply. " + " ".join(
    f"Then sentence number {i} follows it, a little longer than the first one was." for i in range(8)))


def test_split_text_keeps_every_word_in_order() -> None:
    parts = split_text(LONG_TEXT, max_chars=200)
    assert parts[0] == "This first sentence starts the reply."
    assert " ".join(parts) == LONG_TEXT
    assert len(parts) >= 3 and all(len(p) <= 200 for p in parts[1:])
    assert split_text("Dr. Smith came home. He slept.") == ["Dr. Smith came home. He slept."]  # no "Dr." alone
    assert split_text("  One sentence  ") == ["One sentence"]


def test_a_long_input_is_sentence_jobs_across_workers_streamed_in_order(bare_stack: Stack) -> None:
    """Two workers: the sentences synthesize on both, and the reply is exactly their audio, in order."""
    from cosy.workers.engines import SynthesisRequest
    from cosy.workers.engines.tone import ToneEngine

    s = bare_stack
    gw = gateway_with_workers(s, "http", two_tones(FAST_TONE), ["--pcm-rate", "native"]).wait_ready()
    status, _, body = speech_curl(gw, {"model": "tts-1", "input": LONG_TEXT, "voice": "tone",
                                       "response_format": "pcm"})
    assert status == 200, body[:300]
    engine = ToneEngine(**FAST_TONE)
    parts = split_text(LONG_TEXT)
    assert len(parts) >= 2
    expected = np.concatenate([np.concatenate(list(engine.synthesize(SynthesisRequest(p, "tone")))) for p in parts])
    got = np.frombuffer(body, dtype="<i2")
    assert len(got) == len(expected) and np.array_equal(got, expected)
    done = {w["name"]: w["jobs_done"] for w in s.status()["workers"]}
    assert done["tone-a"] >= 1 and done["tone-b"] >= 1, done
    assert sum(done.values()) == len(parts)


def test_a_failed_sentence_ends_the_reply_short_and_cancels_the_rest(bare_stack: Stack) -> None:
    """A sentence that fails after audio went out cannot be taken back: the response is cut off (never a
    complete-looking reply with a hole in it), and the sentences after it are not synthesized."""
    s = bare_stack
    gw = gateway_with_workers(s, "http", two_tones({**FAST_TONE, "fail_on": "BROKEN"}),
                              ["--pcm-rate", "native"]).wait_ready()
    text = LONG_TEXT.replace("number 1 ", "number 1 BROKEN ")
    out = curl("-H", "Content-Type: application/json", "-d",
               json.dumps({"model": "tts-1", "input": text, "voice": "tone", "response_format": "pcm"}),
               f"{gw.url}/v1/audio/speech")
    full = int(len(text) * FAST_TONE["ms_per_char"] / 1000 * 22050) * 2
    assert out.returncode != 0 and 0 < len(out.stdout) < full  # cut off: curl reports the broken transfer
    done = sum(w["jobs_done"] for w in s.status()["workers"])
    assert done < len(split_text(text))  # what came after the failed sentence was cancelled or never sent
    status, _, body = speech_curl(gw, {"model": "tts-1", "input": "And the gateway still serves.", "voice": "tone",
                                       "response_format": "pcm"})
    assert status == 200 and len(body) > 0


def test_split_is_off_with_no_split(bare_stack: Stack) -> None:
    s = bare_stack
    gw = gateway_with_workers(s, "http", two_tones(FAST_TONE), ["--pcm-rate", "native", "--no-split"]).wait_ready()
    status, _, body = speech_curl(gw, {"model": "tts-1", "input": LONG_TEXT, "voice": "tone",
                                       "response_format": "pcm"})
    assert status == 200
    assert sum(w["jobs_done"] for w in s.status()["workers"]) == 1
    assert len(body) // 2 == int(len(LONG_TEXT) * TONE["ms_per_char"] / 1000 * 22050)


def test_gateway_without_workers_is_not_ready(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker()
    gw = GatewayProcess(s, "http", []).start()
    out = curl("-w", "\n%{http_code}", f"{gw.url}/readyz")
    body, _, code = out.stdout.rpartition(b"\n")
    assert code == b"503" and json.loads(body)["ready"] is False
    assert curl("-w", "%{http_code}", "-o", "/dev/null", f"{gw.url}/healthz").stdout == b"200"
    status, headers, data = speech_curl(gw, {"input": "Hello.", "voice": "joe"})
    assert status == 503 and "retry-after" in headers
    assert_openai_error(json.loads(data), "no_workers")
    assert gw.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its clean shutdown
    assert "Application shutdown complete" in s.log_text()


def test_no_audio_in_time_is_504_and_the_job_is_cancelled(bare_stack: Stack) -> None:
    s = bare_stack
    s.start_broker()
    s.start_worker("tone", options={**TONE, "capacity": 1, "delay_ms": 200})
    gw = GatewayProcess(s, "http", ["--timeout", "1"]).start()
    # The only worker slot is taken by a long job (a chunk every 200 ms keeps that stream alive).
    holder = subprocess.Popen(["curl", "-sS", "-N", "-o", "/dev/null", "-d",
                               json.dumps({"input": "w" * 200, "voice": "tone"}), f"{gw.url}/v1/audio/speech"])
    try:
        wait_for(lambda: busy(s.status()) == (1, 0), 20, "the long job to run")
        status, _, data = speech_curl(gw, {"input": "Waits in the queue.", "voice": "tone"})
        assert status == 504
        assert_openai_error(json.loads(data), "timeout")
        wait_for(lambda: s.status()["counters"]["cancelled"] == 1, 15, "the timed-out job to be cancelled")
        assert busy(s.status()) == (1, 0)
    finally:
        holder.terminate()
        holder.wait(10)


def test_gateway_rides_out_a_broker_restart(bare_stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    s = bare_stack
    s.start_broker()
    s.start_worker("tone", options=TONE)
    gw = GatewayProcess(s, "http", []).start()

    def ready() -> bool:
        return curl(f"{gw.url}/readyz").stdout.startswith(b'{"ready":true')

    def broker_up() -> float:
        text = curl(f"{gw.url}/metrics").stdout.decode()
        return {f.name: f for f in text_string_to_metric_families(text)}["cosy_broker_up"].samples[0].value

    wait_for(ready, 20, "the gateway ready")
    assert broker_up() == 1
    s.kill(s.broker, signal.SIGTERM)
    wait_for(lambda: not ready(), 20, "/readyz to notice the broker is gone")
    wait_for(lambda: broker_up() == 0, 20, "cosy_broker_up to drop")
    status, headers, data = speech_curl(gw, {"input": "Anyone there?", "voice": "tone"})
    assert status == 503 and "retry-after" in headers
    s.start_broker()
    wait_for(ready, 30, "the gateway ready again (the worker and the gateway reconnect by themselves)")
    status, _, data = speech_curl(gw, {"input": "Back again.", "voice": "tone", "response_format": "wav"})
    assert status == 200
    audio, rate = decode(data)
    assert len(audio) == int(len("Back again.") * 0.02 * TONE_RATE)


# --- listing and health ---------------------------------------------------------------------------------


def test_models_voices_and_probes(served) -> None:
    _, gw = served
    client = openai_client(gw)
    ids = {m.id for m in client.models.list()}
    assert {"tts-1", "tts-1-hd", "cosy", "piper", "tone"} <= ids
    voices = json.loads(curl(f"{gw.url}/v1/audio/voices").stdout)["voices"]
    assert {v["id"] for v in voices if "workers" in v} == {"joe", "tone"}
    assert json.loads(curl(f"{gw.url}/readyz").stdout) == {"ready": True, "workers": 2, "voices": ["joe", "tone"]}
    assert json.loads(curl(f"{gw.url}/healthz").stdout) == {"status": "ok"}


def test_metrics_parse_and_include_the_histograms(served) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, gw = served
    speech_curl(gw, {"input": "Metrics.", "voice": "tone", "response_format": "wav"})
    text = curl(f"{gw.url}/metrics").stdout.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("cosy_gateway_ttfc_seconds", "cosy_gateway_rtf", "cosy_gateway_time_to_first_byte_seconds"):
        assert families[name].type == "histogram", name
        count = [s.value for s in families[name].samples if s.name == f"{name}_count"]
        assert sum(count) >= 1, name
    assert families["cosy_broker_up"].samples[0].value == 1
    assert families["cosy_workers"].samples[0].value == 2
    queue = {s.labels["priority"] for s in families["cosy_queue_depth"].samples}
    assert queue == {"interactive", "bulk"}
    jobs = {s.labels["outcome"]: s.value for s in families["cosy_jobs"].samples if s.name == "cosy_jobs_total"}
    assert jobs["done"] >= 1
    workers = {s.labels["worker"] for s in families["cosy_worker_capacity"].samples}
    assert workers == {"piper-0", "tone-0"}


def test_broker_metrics_serve_what_the_broker_reports() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from cosy.metrics import BrokerMetrics

    m = BrokerMetrics()
    m.observe_done(ttfc_ms=120.0, rtf=0.25)
    m.observe_done(ttfc_ms=80.0, rtf=0.5)
    m.count("failed")
    m.retried()
    m.update_queue(interactive=3, bulk=7, workers=2)
    gpu = {"gpu_mem_used_mb": 2048.0, "gpu_util_pct": 75.0, "gpu_temp_c": 61.0, "gpu_power_w": 180.5}
    m.update_workers([{"name": "gpu0", "capacity": 2, "running": 1, "metrics": gpu},
                      {"name": "cpu", "capacity": 1, "running": 0, "metrics": {}}])
    m.update_workers([{"name": "gpu0", "capacity": 2, "running": 2, "metrics": gpu}])  # cpu left
    port = free_port()
    m.serve(port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    fam = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str | None = None, **labels: str) -> float:
        return next(s.value for s in fam[family].samples
                    if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()))

    assert fam["cosy_ttfc_seconds"].type == "histogram" and fam["cosy_rtf"].type == "histogram"
    assert value("cosy_ttfc_seconds", "cosy_ttfc_seconds_count") == 2
    assert value("cosy_ttfc_seconds", "cosy_ttfc_seconds_sum") == pytest.approx(0.2)
    assert value("cosy_ttfc_seconds", "cosy_ttfc_seconds_bucket", le="0.1") == 1
    assert value("cosy_rtf", "cosy_rtf_bucket", le="0.3") == 1
    assert value("cosy_jobs", "cosy_jobs_total", outcome="done") == 2
    assert value("cosy_jobs", "cosy_jobs_total", outcome="failed") == 1
    assert value("cosy_job_retries", "cosy_job_retries_total") == 1
    assert value("cosy_queue_depth", priority="interactive") == 3
    assert value("cosy_queue_depth", priority="bulk") == 7
    assert value("cosy_workers") == 2
    assert value("cosy_worker_gpu_memory_used_bytes", worker="gpu0") == 2048 * 1024 * 1024
    assert value("cosy_worker_gpu_utilization_ratio", worker="gpu0") == pytest.approx(0.75)
    assert value("cosy_worker_gpu_temperature_celsius", worker="gpu0") == 61
    assert value("cosy_worker_gpu_power_watts", worker="gpu0") == 180.5
    assert value("cosy_worker_running", worker="gpu0") == 2
    assert {s.labels["worker"] for s in fam["cosy_worker_capacity"].samples} == {"gpu0"}


# --- auth ------------------------------------------------------------------------------------------------


def test_api_key_is_checked(bare_stack: Stack) -> None:
    import openai

    s = bare_stack
    s.start_broker()
    s.start_worker("tone", options=TONE)
    gw = GatewayProcess(s, "http", ["--api-key", API_KEY]).start()
    status, _, data = speech_curl(gw, {"input": "Hi.", "voice": "tone"})
    assert status == 401
    assert_openai_error(json.loads(data), "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai_client(gw, api_key="wrong", max_retries=0).audio.speech.create(model="tts-1", voice="tone",
                                                                              input="Hi.")
    with openai_client(gw, api_key=API_KEY).audio.speech.with_streaming_response.create(
            model="tts-1", voice="tone", input="Hi there.", response_format="wav") as resp:
        audio, rate = decode(resp.read())
    assert rate == TONE_RATE and len(audio) == int(len("Hi there.") * 0.02 * TONE_RATE)
    # Probes stay open for load balancers and systemd.
    assert curl("-w", "%{http_code}", "-o", "/dev/null", f"{gw.url}/healthz").stdout == b"200"


def test_non_loopback_without_api_key_is_refused(bare_stack: Stack) -> None:
    s = bare_stack
    s.runtime_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([*COSY, "http", "--host", "0.0.0.0", "--port", str(free_port()),
                           "--runtime-dir", str(s.runtime_dir)], env={**s.env, "COSY_API_KEY": ""},
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert b"--api-key" in proc.stderr
