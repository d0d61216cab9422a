"""`cosy wyoming`: a Wyoming TTS server (Home Assistant's local voice protocol) in front of the broker.

- ``describe`` -> ``info``: one TTS program, ``cosy``, whose voices are those the connected
  workers serve; ``supports_synthesize_streaming`` is true.
- ``synthesize`` -> ``audio-start``, ``audio-chunk``... as the worker produces them, ``audio-stop``.
- streaming text: ``synthesize-start``, ``synthesize-chunk``... ``synthesize-stop``. Each complete
  sentence becomes a broker job the moment it arrives, so several workers can render later
  sentences while an earlier one is still being sent; the audio goes out in order, one
  ``audio-start``/``audio-stop`` cycle per sentence (as wyoming-piper does), then
  ``synthesize-stopped``. A plain ``synthesize`` inside a stream (Home Assistant sends one for
  older servers) is ignored.
- Failures are ``error`` events; a client that disconnects cancels its jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlparse

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from cosy import __version__
from cosy import protocol as P
from cosy.client import Audio, Completed, Failed, JobSpec, Rejected
from cosy.endpoints import Endpoints
from cosy.gateways.bridge import BrokerBridge, GatewayError, JobHandle
from cosy.gateways.segments import SentenceSplitter
from cosy.metrics import GatewayMetrics

log = logging.getLogger("cosy.wyoming")

API = "wyoming"
ATTRIBUTION = Attribution(name="cosy", url="https://github.com/")
SAMPLE_WIDTH = 2
CHANNELS = 1


@dataclass
class WyomingConfig:
    uri: str = "tcp://127.0.0.1:10200"
    languages: tuple[str, ...] | list[str] = ("en",)
    timeout_s: float = 60.0
    metrics_port: int | None = None


def parse_uri(uri: str) -> tuple[str | None, int | None]:
    """(host, port) of a tcp:// URI, (None, None) for unix:// and stdio://; ValueError otherwise."""
    parsed = urlparse(uri)
    if parsed.scheme == "tcp":
        if not parsed.hostname or parsed.port is None:
            raise ValueError(f"expected tcp://HOST:PORT, got {uri!r}")
        return parsed.hostname, parsed.port
    if parsed.scheme in ("unix", "stdio"):
        return None, None
    raise ValueError(f"--uri must be tcp://HOST:PORT, unix://PATH or stdio://, got {uri!r}")


class SpeakError(Exception):
    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


@dataclass
class StreamEnd:
    """Marks the end of a synthesize-start/-stop stream in the output queue."""


class WyomingGateway:
    """What every connection shares: the broker bridge, the config and the metrics."""

    def __init__(self, endpoints: Endpoints, config: WyomingConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.bridge = BrokerBridge(endpoints)
        self.metrics.broker.source = lambda: (self.bridge.snapshot().status, self.bridge.broker_up)

    async def info(self) -> Info:
        try:
            snap = await self.bridge.status()
        except GatewayError:
            snap = self.bridge.snapshot()
        languages = list(self.config.languages)
        voices = []
        for name in snap.voices:
            workers = [w for w in snap.workers if name in w.get("voices", [])]
            engines = sorted({f"{w.get('engine')}/{w.get('model')}" for w in workers})
            voices.append(TtsVoice(name=name, attribution=ATTRIBUTION, installed=True,
                                   description=f"{name} ({', '.join(engines)})", version=__version__,
                                   languages=languages))
        program = TtsProgram(name="cosy", attribution=ATTRIBUTION, installed=True,
                             description="cosy: streaming TTS over a ZeroMQ broker and GPU workers",
                             version=__version__, voices=voices, supports_synthesize_streaming=True)
        return Info(tts=[program])

    def submit(self, text: str, voice: SynthesizeVoice | None) -> JobHandle:
        name = voice.name if voice is not None and voice.name else None
        spec = JobSpec(text=text, voice=name, priority=P.INTERACTIVE)
        spec.job = f"wy-{spec.job}"
        return self.bridge.submit(spec)


class CosyEventHandler(AsyncEventHandler):
    """One Wyoming connection. Reading goes on while audio is sent, so a disconnect is seen at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 gateway: WyomingGateway) -> None:
        super().__init__(reader, writer)
        self.gw = gateway
        self._out: asyncio.Queue[JobHandle | StreamEnd | SpeakError] = asyncio.Queue()
        self._open: set[JobHandle] = set()
        self._speaker: asyncio.Task[None] | None = None
        self._splitter: SentenceSplitter | None = None
        self._stream_voice: SynthesizeVoice | None = None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event((await self.gw.info()).event())
        elif Synthesize.is_type(event.type):
            if self._splitter is None:  # inside a stream it only repeats the text for older servers
                synth = Synthesize.from_event(event)
                self._queue_text(synth.text, synth.voice)
        elif SynthesizeStart.is_type(event.type):
            self._splitter = SentenceSplitter()
            self._stream_voice = SynthesizeStart.from_event(event).voice
        elif SynthesizeChunk.is_type(event.type):
            if self._splitter is not None:
                for sentence in self._splitter.add(SynthesizeChunk.from_event(event).text):
                    self._queue_text(sentence, self._stream_voice)
        elif SynthesizeStop.is_type(event.type):
            if self._splitter is not None:
                rest = self._splitter.finish()
                if rest:
                    self._queue_text(rest, self._stream_voice)
                self._splitter = None
                self._enqueue(StreamEnd())
        return True

    def _queue_text(self, text: str, voice: SynthesizeVoice | None) -> None:
        if not text.strip():
            return
        try:
            handle = self.gw.submit(text, voice)
        except GatewayError as exc:
            log.warning("cannot submit: %s", exc)
            self._enqueue(SpeakError(str(exc), "unavailable"))
            return
        self._open.add(handle)
        self._enqueue(handle)

    def _enqueue(self, item: JobHandle | StreamEnd | SpeakError) -> None:
        self._out.put_nowait(item)
        if self._speaker is None:
            self._speaker = asyncio.create_task(self._speak_all(), name="cosy wyoming speaker")

    async def _speak_all(self) -> None:
        """Send each queued job's audio in order, as it arrives."""
        while True:
            item = await self._out.get()
            if isinstance(item, StreamEnd):
                await self.write_event(SynthesizeStopped().event())
                continue
            if isinstance(item, SpeakError):
                await self.write_event(Error(item.text, item.code).event())
                continue
            try:
                await self._speak(item)
            except SpeakError as exc:
                log.warning("job %s: %s", item.job, exc.text)
                await self.write_event(Error(exc.text, exc.code).event())
            finally:
                self._open.discard(item)

    async def _speak(self, handle: JobHandle) -> None:
        m = self.gw.metrics
        t0 = time.monotonic()
        started = False
        sent = 0
        m.active.labels(API).inc()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(handle.events.get(), self.gw.config.timeout_s)
                except asyncio.TimeoutError:
                    raise SpeakError(f"no audio for {self.gw.config.timeout_s:g} s", "timeout") from None
                if isinstance(ev, Audio):
                    if ev.restart and sent:
                        raise SpeakError("a worker was lost mid-sentence; the audio sent cannot be taken back",
                                         P.WORKER_LOST)
                    if not started:
                        m.ttfb.labels(API).observe(time.monotonic() - t0)
                        await self.write_event(AudioStart(ev.sample_rate, SAMPLE_WIDTH, CHANNELS).event())
                        started = True
                    sent += len(ev.pcm)
                    await self.write_event(AudioChunk(ev.sample_rate, SAMPLE_WIDTH, CHANNELS,
                                                      ev.pcm.astype("<i2", copy=False).tobytes()).event())
                elif isinstance(ev, Completed):
                    handle.finished = True
                    await self._finish(ev, started, sent)
                    m.requests.labels(API, "200").inc()
                    return
                elif isinstance(ev, (Rejected, Failed)):
                    handle.finished = True
                    m.requests.labels(API, ev.code.lower()).inc()
                    raise SpeakError(ev.message, ev.code.lower())
        except SpeakError:
            if started:  # close the audio cycle, then the error says why it is short
                await self.write_event(AudioStop().event())
            raise
        finally:
            m.active.labels(API).dec()
            if not handle.finished:
                self.gw.bridge.cancel(handle)

    async def _finish(self, ev: Completed, started: bool, sent: int) -> None:
        rate = ev.sample_rate
        if not started:
            await self.write_event(AudioStart(rate, SAMPLE_WIDTH, CHANNELS).event())
        if sent < len(ev.audio):  # audio the live events did not carry (should not happen)
            await self.write_event(AudioChunk(rate, SAMPLE_WIDTH, CHANNELS, ev.audio[sent:].tobytes()).event())
        await self.write_event(AudioStop().event())
        self.gw.metrics.audio_seconds.labels(API).inc(len(ev.audio) / rate)
        self.gw.metrics.job_done(ev.done.ttfc_ms, ev.done.rtf)

    async def disconnect(self) -> None:
        """The client went away: stop sending and cancel what it asked for."""
        if self._speaker is not None:
            self._speaker.cancel()
            try:
                await self._speaker
            except (asyncio.CancelledError, Exception):
                pass
        for handle in list(self._open):
            if not handle.finished:
                self.gw.metrics.disconnects.labels(API).inc()
            self.gw.bridge.cancel(handle)
        self._open.clear()


async def serve(endpoints: Endpoints, config: WyomingConfig) -> None:
    gw = WyomingGateway(endpoints, config)
    if config.metrics_port:
        from cosy.metrics import serve as serve_metrics

        serve_metrics(gw.metrics.registry, config.metrics_port)
    gw.bridge.start()
    server = AsyncServer.from_uri(config.uri)
    log.info("cosy wyoming server on %s (broker %s)", config.uri, endpoints.front)
    try:
        await server.run(partial(CosyEventHandler, gateway=gw))
    finally:
        gw.bridge.stop()


def run_wyoming(endpoints: Endpoints, config: WyomingConfig) -> int:
    try:
        asyncio.run(serve(endpoints, config))
    except KeyboardInterrupt:
        return 130
    return 0
