"""The gateways in front of a broker on tcp with CURVE: both of the bridge's sockets (jobs and status) use the keys.

Before the bridge secured its status socket, a gateway with `--connect tcp://...` and keys never got a status
reply, so every speech request answered 503. `curve_stack()` is shared with the other gateways' CURVE tests.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import HEARTBEAT_MS, Stack, wait_for
from test_http_gateway import (
    COSY,
    TONE,
    TONE_RATE,
    GatewayProcess,
    assert_openai_error,
    curl,
    decode,
    free_port,
    speech_curl,
)
from test_security import HOST, keys

from cosy.endpoints import free_tcp_base

pytest.importorskip("starlette")


def curve_stack(s: Stack, tmp: Path) -> tuple[str, dict[str, Path]]:
    """A broker bound on tcp with CURVE and a tone worker let in by its key: (the broker's url, the key folders)."""
    d = keys(tmp)
    url = f"tcp://{HOST}:{free_tcp_base(HOST)}"
    broker = s.spawn("broker", "--bind", url, "--curve-dir", str(d["broker"]), "--runtime-dir", str(s.runtime_dir),
                     "--heartbeat-ms", str(HEARTBEAT_MS), name="broker")
    s.spawn("worker", "--engine", "tone", "--name", "remote", "--connect", url, "--curve-dir", str(d["worker"]),
            *[a for k, v in TONE.items() for a in ("--option", f"{k}={v}")], "--runtime-dir", str(s.runtime_dir),
            "--heartbeat-ms", str(HEARTBEAT_MS), name="worker")
    assert broker.poll() is None, s.log_text()
    return url, d


def worker_joined(s: Stack, url: str, curve: Path) -> bool:
    proc = subprocess.run([*COSY, "status", "--json", "--connect", url], env={**s.env, "COSY_CURVE_DIR": str(curve)},
                          capture_output=True, timeout=30)
    return proc.returncode == 0 and b'"remote"' in proc.stdout


def gateway_args(url: str, curve: Path) -> list[str]:
    return ["--connect", url, "--curve-dir", str(curve)]


@pytest.fixture
def curve(bare_stack: Stack, tmp_path: Path) -> Iterator[tuple[Stack, str, dict[str, Path]]]:
    url, d = curve_stack(bare_stack, tmp_path)
    yield bare_stack, url, d


def test_http_gateway_serves_over_curve(curve) -> None:
    s, url, d = curve
    gw = GatewayProcess(s, "http", gateway_args(url, d["client"])).start().wait_ready()
    voices = json.loads(curl(f"{gw.url}/v1/audio/voices").stdout)["voices"]
    assert "tone" in {v["id"] for v in voices}
    status, _, data = speech_curl(gw, {"input": "over curve", "voice": "tone", "response_format": "wav"})
    assert status == 200, data[:300]
    audio, rate = decode(data)
    assert rate == TONE_RATE and len(audio) == int(len("over curve") * 0.02 * TONE_RATE)


def test_http_gateway_with_a_key_the_broker_does_not_know_answers_503(curve) -> None:
    s, url, d = curve
    gw = GatewayProcess(s, "http", gateway_args(url, d["stranger"])).start()
    status, headers, data = speech_curl(gw, {"input": "let me in", "voice": "tone"})
    assert status == 503 and "retry-after" in headers
    assert_openai_error(json.loads(data), "broker_unreachable")
    assert curl("-w", "%{http_code}", "-o", "/dev/null", f"{gw.url}/healthz").stdout == b"200"


def test_gateway_with_missing_keys_exits_with_a_clear_message(curve, tmp_path: Path) -> None:
    s, url, _ = curve
    empty = tmp_path / "nokeys"
    empty.mkdir()
    proc = subprocess.run([*COSY, "http", "--port", str(free_port()), *gateway_args(url, empty)], env=s.env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"client.key_secret" in proc.stderr and b"Traceback" not in proc.stderr


def test_wyoming_gateway_serves_over_curve(curve) -> None:
    pytest.importorskip("wyoming")
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.tts import Synthesize, SynthesizeVoice

    s, url, d = curve
    wait_for(lambda: worker_joined(s, url, d["client"]), 60, "the worker to join over CURVE", interval=0.2)
    gw = GatewayProcess(s, "wyoming", gateway_args(url, d["client"])).start()

    async def speak() -> tuple[int, bytes]:
        async with AsyncTcpClient("127.0.0.1", gw.port, connect_timeout=10, read_timeout=30) as client:
            await client.write_event(Synthesize("over curve", voice=SynthesizeVoice(name="tone")).event())
            rate, pcm = 0, b""
            while True:
                event = await asyncio.wait_for(client.read_event(), 30)
                assert event is not None and event.type != "error", event
                if AudioStart.is_type(event.type):
                    rate = AudioStart.from_event(event).rate
                elif AudioChunk.is_type(event.type):
                    pcm += AudioChunk.from_event(event).audio
                elif AudioStop.is_type(event.type):
                    return rate, pcm

    rate, pcm = asyncio.run(asyncio.wait_for(speak(), 60))
    assert rate == TONE_RATE and len(pcm) // 2 == int(len("over curve") * 0.02 * TONE_RATE)
