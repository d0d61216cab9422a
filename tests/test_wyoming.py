"""`cosy wyoming`: a Wyoming TTS server, driven by the wyoming package's own client and wyoming-bench."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from stack import Stack, transcribe, wait_for
from test_http_gateway import (
    COSY,
    FOX,
    FOX_WORDS,
    PIPER_AND_TONE,
    TONE_RATE,
    ChunkObserver,
    GatewayProcess,
    free_port,
    gateway_with_workers,
)

pytest.importorskip("wyoming")

from wyoming.audio import AudioChunk, AudioStart  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.tts import (  # noqa: E402
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

TIMEOUT = 30.0
BENCH = shutil.which("wyoming-bench") or str(Path(sys.executable).parent / "wyoming-bench")


@dataclass
class Cycle:
    """One audio-start ... audio-stop cycle as a client received it."""

    start: AudioStart
    pcm: bytearray = field(default_factory=bytearray)
    chunk_times: list[float] = field(default_factory=list)

    def audio(self) -> np.ndarray:
        return np.frombuffer(bytes(self.pcm), dtype="<i2")


async def read_cycles(client: AsyncTcpClient, until: str) -> tuple[list[Cycle], list[Event]]:
    """Read audio cycles until an event of type ``until`` (audio-stop or synthesize-stopped) or an error."""
    cycles: list[Cycle] = []
    others: list[Event] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), TIMEOUT)
        assert event is not None, "the server closed the connection"
        if AudioStart.is_type(event.type):
            cycles.append(Cycle(AudioStart.from_event(event)))
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            assert (chunk.rate, chunk.width, chunk.channels) == (cycles[-1].start.rate, 2, 1)
            cycles[-1].pcm += chunk.audio
            cycles[-1].chunk_times.append(time.monotonic())
        else:
            others.append(event)
        if event.type == until or Error.is_type(event.type):
            return cycles, others


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Stack, GatewayProcess]]:
    s = Stack()
    try:
        gw = gateway_with_workers(s, "wyoming", PIPER_AND_TONE)
        yield s, gw
    finally:
        s.stop()


def connect(gw: GatewayProcess) -> AsyncTcpClient:
    return AsyncTcpClient("127.0.0.1", gw.port, connect_timeout=10, read_timeout=TIMEOUT)


def test_describe_lists_the_workers_voices(served) -> None:
    _, gw = served

    async def go() -> Info:
        async with connect(gw) as client:
            await client.write_event(Describe().event())
            event = await client.read_event()
            assert event is not None and Info.is_type(event.type)
            return Info.from_event(event)

    info = run(go())
    (program,) = info.tts
    assert program.name == "cosy" and program.supports_synthesize_streaming
    assert {v.name for v in program.voices} == {"joe", "tone"}
    assert all(v.languages == ["en"] and v.installed for v in program.voices)


def test_synthesize_returns_valid_speech(served) -> None:
    _, gw = served

    async def go() -> tuple[list[Cycle], list[Event]]:
        async with connect(gw) as client:
            await client.write_event(Synthesize(FOX, voice=SynthesizeVoice(name="joe")).event())
            return await read_cycles(client, "audio-stop")

    cycles, others = run(go())
    assert [e.type for e in others] == ["audio-stop"]
    (cycle,) = cycles
    assert (cycle.start.rate, cycle.start.width, cycle.start.channels) == (22050, 2, 1)
    audio = cycle.audio()
    assert 1.5 <= len(audio) / 22050 <= 6.0
    heard = set(transcribe(audio, 22050).split())
    assert len(heard & FOX_WORDS) >= 4, f"recognised only {heard}"


def test_synthesize_streams_audio_as_it_is_made(served) -> None:
    stack, gw = served
    observer = ChunkObserver(stack)
    try:
        async def go(text: str) -> list[Cycle]:
            async with connect(gw) as client:
                await client.write_event(Synthesize(text, voice=SynthesizeVoice(name="tone")).event())
                cycles, _ = await read_cycles(client, "audio-stop")
                return cycles

        # The observer is live once it has seen a whole job go by.
        run(go("warm up"))
        wait_for(lambda: any(h.final for _, h in observer.seen), 10, "the observer to see a job end")
        mark = len(observer.seen)
        # 30 chunks, 100 ms apart: seconds of slack for a loaded machine, none for a gateway that buffers.
        (cycle,) = run(go("x" * 150))
        # The observer's own subscriber may see the final chunk after the gateway's client did.
        finals = wait_for(lambda: [(t, h) for t, h in observer.seen[mark:] if h.final], 10,
                          "the observer to see the job's final chunk")
        assert len(finals) == 1
        t_final, final = finals[0]
        assert len(cycle.audio()) == final.total_samples == 3 * TONE_RATE
        assert cycle.chunk_times[0] < t_final
        assert len(cycle.chunk_times) >= 30
    finally:
        observer.close()


def test_streaming_text_input_one_cycle_per_sentence(served) -> None:
    _, gw = served
    sentences = ["One sentence here.", "A second one!", "And the third?", "Unfinished tail"]
    pieces = ["One sent", "ence here. A sec", "ond one! And the ", "third? Unfinished", " tail"]

    async def go() -> tuple[list[Cycle], list[Event]]:
        async with connect(gw) as client:
            await client.write_event(SynthesizeStart(voice=SynthesizeVoice(name="tone")).event())
            for piece in pieces:
                await client.write_event(SynthesizeChunk(piece).event())
            # Home Assistant also sends the whole text for older servers: it must not be spoken twice.
            await client.write_event(Synthesize("".join(pieces), voice=SynthesizeVoice(name="tone")).event())
            await client.write_event(SynthesizeStop().event())
            return await read_cycles(client, SynthesizeStopped().event().type)

    cycles, others = run(go())
    assert [e.type for e in others] == ["audio-stop"] * 4 + ["synthesize-stopped"]
    # The tone engine makes 20 ms of audio per character: each cycle is exactly its sentence.
    assert [len(c.audio()) for c in cycles] == [int(len(s) * 0.02 * TONE_RATE) for s in sentences]


def test_unknown_voice_is_an_error_event(served) -> None:
    _, gw = served

    async def go() -> tuple[list[Cycle], list[Event]]:
        async with connect(gw) as client:
            await client.write_event(Synthesize("Hello.", voice=SynthesizeVoice(name="nobody")).event())
            return await read_cycles(client, "audio-stop")

    cycles, others = run(go())
    assert cycles == []
    error = Error.from_event(others[-1])
    assert error.code == "unknown_voice" and "joe" in error.text


def test_disconnect_cancels_the_job(served) -> None:
    stack, gw = served
    before = stack.status()["counters"]

    async def go() -> None:
        async with connect(gw) as client:
            await client.write_event(Synthesize("v" * 500, voice=SynthesizeVoice(name="tone")).event())
            while True:
                event = await client.read_event()
                assert event is not None
                if AudioChunk.is_type(event.type):
                    return  # leave after the first chunk of 100

    run(go())
    wait_for(lambda: stack.status()["counters"]["cancelled"] > before["cancelled"], 15, "the job to be cancelled")
    assert stack.status()["counters"]["done"] == before["done"]


@pytest.mark.skipif(not Path(BENCH).exists(), reason="wyoming-bench is not installed")
def test_wyoming_bench_runs_both_modes(served) -> None:
    _, gw = served
    out = subprocess.run([BENCH, "tts", f"127.0.0.1:{gw.port}", "--rounds", "1", "--warmup", "0",
                          "--timeout", "30", "--texts", "First sentence here. And a second one.",
                          "--config", '{"voice": "tone"}'], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[non_streaming] ok=1 fail=0" in out.stdout, out.stdout
    assert "[streaming] ok=1 fail=0" in out.stdout, out.stdout


def test_metrics_port_then_a_clean_stop_and_no_public_address_without_allow_remote(bare_stack: Stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    s = bare_stack
    s.start_broker()
    metrics_port = free_port()
    gw = GatewayProcess(s, "wyoming", ["--metrics-port", str(metrics_port)]).start()

    def broker_up() -> bool:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        return families["cosy_broker_up"].samples[0].value == 1 and "cosy_gateway_ttfc_seconds" in families

    wait_for(broker_up, 15, "the wyoming gateway's metrics to show the broker")
    assert gw.stop() == 0
    refused = subprocess.run([*COSY, "wyoming", "--uri", f"tcp://0.0.0.0:{free_port()}",
                              "--runtime-dir", str(s.runtime_dir)], env=s.env, capture_output=True, timeout=30)
    assert refused.returncode == 2
    assert b"--allow-remote" in refused.stderr
