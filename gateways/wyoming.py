"""`cosy wyoming`: a Wyoming TTS server (Home Assistant's local voice protocol) in front of the broker.

- ``describe`` -> ``info``: one TTS program, ``cosy``, whose voices are those the connected
  workers serve; ``supports_synthesize_streaming`` is true.
- ``synthesize`` -> ``audio-start``, ``audio-chunk``... as the worker produces them, ``audio-stop``.
- streaming text: ``synthesize-start``, ``synthesize-chunk``... ``synthesize-stop``. Each complete
  sentence (cut by :class:`cosy.segments.SentenceSplitter`, as the HTTP gateway's: "Dr." waits for the
  rest of its sentence, a very long one is cut at a clause or a space) becomes a broker job the moment
  it arrives, so several workers can render later
  sentences while an earlier one is still being sent; the audio goes out in order, one
  ``audio-start``/``audio-stop`` cycle per sentence (as wyoming-piper does), then
  ``synthesize-stopped``. A plain ``synthesize`` inside a stream (Home Assistant sends one for
  older servers) is ignored.
- Failures are ``error`` events; a client that disconnects cancels its jobs. Each job is read through
  :mod:`cosy.gateways.jobstream`, as the other gateways read theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped, SynthesizeVoice

from cosy import __version__
from cosy import protocol as P
from cosy.client import JobSpec
from cosy.endpoints import Endpoints
from cosy.gateways import jobstream as js
from cosy.gateways.bridge import BrokerBridge, GatewayError
from cosy.metrics import GatewayMetrics
from cosy.segments import SentenceSplitter, TextTooLong

log = logging.getLogger("cosy.wyoming")

API = "wyoming"
ATTRIBUTION = Attribution(name="cosy", url="https://github.com/")
SAMPLE_WIDTH = 2
CHANNELS = 1
STOP_GRACE_S = 5.0  # on SIGTERM, the syntheses in flight get this long to be sent whole


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

    async def open(self, text: str, voice: SynthesizeVoice | None) -> js.JobStream:
        """Submit one sentence (or a whole one-shot text) as a job; JobError when it cannot be."""
        name = voice.name if voice is not None and voice.name else None
        spec = JobSpec(text=text, voice=name, priority=P.INTERACTIVE)
        spec.job = f"wy-{spec.job}"
        return await js.open_stream(self.bridge, spec, timeout_s=self.config.timeout_s, metrics=self.metrics,
                                    api=API)


class CosyEventHandler(AsyncEventHandler):
    """One Wyoming connection. Reading goes on while audio is sent, so a disconnect is seen at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 gateway: WyomingGateway) -> None:
        super().__init__(reader, writer)
        self.gw = gateway
        self._out: asyncio.Queue[js.JobStream | StreamEnd | js.JobError] = asyncio.Queue()
        self._open: set[js.JobStream] = set()
        self._speaker: asyncio.Task[None] | None = None
        self._splitter: SentenceSplitter | None = None
        self._stream_voice: SynthesizeVoice | None = None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event((await self.gw.info()).event())
        elif Synthesize.is_type(event.type):
            if self._splitter is None:  # inside a stream it only repeats the text for older servers
                synth = Synthesize.from_event(event)
                await self._queue_text(synth.text, synth.voice)
        elif SynthesizeStart.is_type(event.type):
            self._splitter = SentenceSplitter()
            self._stream_voice = SynthesizeStart.from_event(event).voice
        elif SynthesizeChunk.is_type(event.type):
            if self._splitter is not None:
                await self._queue_sentences(lambda s: s.add(SynthesizeChunk.from_event(event).text))
        elif SynthesizeStop.is_type(event.type):
            if self._splitter is not None:
                await self._queue_sentences(SentenceSplitter.flush)
                self._splitter = None
                self._enqueue(StreamEnd())
        return True

    async def _queue_sentences(self, cut: Callable[[SentenceSplitter], list[str]]) -> None:
        """The sentences the streamed text completed (short pieces such as "Dr." wait for the next, long ones
        are cut at a clause or a space: the HTTP gateway's splitter), each as a job."""
        assert self._splitter is not None
        try:
            sentences = cut(self._splitter)
        except TextTooLong as exc:
            self._splitter = SentenceSplitter()  # what was held is refused; the stream goes on
            self._enqueue(js.JobError(P.TEXT_TOO_LONG, str(exc)))
            return
        for sentence in sentences:
            await self._queue_text(sentence, self._stream_voice)

    async def _queue_text(self, text: str, voice: SynthesizeVoice | None) -> None:
        if not text.strip():
            return
        try:
            stream = await self.gw.open(text, voice)
        except js.JobError as err:
            log.warning("cannot submit: %s", err.message)
            self._enqueue(err)
            return
        self._open.add(stream)
        self._enqueue(stream)

    def _enqueue(self, item: js.JobStream | StreamEnd | js.JobError) -> None:
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
            if isinstance(item, js.JobError):
                await self._error(item)
                continue
            try:
                await self._speak(item)
            except js.JobError as err:
                log.warning("job %s: %s", item.job, err.message)
                await self._error(err)
            finally:
                self._open.discard(item)

    async def _error(self, err: js.JobError) -> None:
        self.gw.metrics.requests.labels(API, err.code.lower()).inc()
        await self.write_event(Error(err.message, err.code.lower()).event())

    async def _speak(self, stream: js.JobStream) -> None:
        """One audio-start ... audio-stop cycle; a failure after audio-start still closes it, then the error
        event (sent by the caller) says why it is short."""
        try:
            rate = await stream.start()
            await self.write_event(AudioStart(rate, SAMPLE_WIDTH, CHANNELS).event())
            try:
                async with contextlib.aclosing(stream.audio()) as chunks:
                    async for data in chunks:
                        await self.write_event(AudioChunk(rate, SAMPLE_WIDTH, CHANNELS, data).event())
            except js.StreamAborted:
                await self.write_event(AudioStop().event())
                raise
            await self.write_event(AudioStop().event())
            self.gw.metrics.requests.labels(API, "200").inc()
        finally:
            if stream.cancel():  # still live: the client went away (or the connection broke) mid-job
                self.gw.metrics.disconnects.labels(API).inc()

    async def disconnect(self) -> None:
        """The client went away: stop sending and cancel what it asked for."""
        if self._speaker is not None:
            self._speaker.cancel()
            try:
                await self._speaker
            except (asyncio.CancelledError, Exception):
                pass
        for stream in list(self._open):
            if stream.cancel():
                self.gw.metrics.disconnects.labels(API).inc()
        self._open.clear()


async def serve(endpoints: Endpoints, config: WyomingConfig) -> None:
    """Serve until SIGTERM or SIGINT. Then: no new connection, up to ``STOP_GRACE_S`` for the syntheses in flight to
    be sent whole, the rest cancelled (each connection's disconnect), the bridge stopped. The same with every
    wyoming version: the server is ours (newer wyoming servers stop on SIGTERM themselves, at once, cutting the
    audio being sent; older ones die of it)."""
    gw = WyomingGateway(endpoints, config)
    if config.metrics_port:
        from cosy.metrics import serve as serve_metrics

        serve_metrics(gw.metrics.registry, config.metrics_port)
    gw.bridge.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if urlparse(config.uri).scheme == "stdio":  # one connection: wyoming's own server, until EOF or a signal
            server_task = asyncio.ensure_future(AsyncServer.from_uri(config.uri).run(
                partial(CosyEventHandler, gateway=gw)))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({server_task, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for task in (server_task, stopping):
                task.cancel()
            await asyncio.gather(server_task, stopping, return_exceptions=True)
            return
        await _serve_sockets(gw, config, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        gw.bridge.stop()


async def _serve_sockets(gw: WyomingGateway, config: WyomingConfig, stop: asyncio.Event) -> None:
    connections: dict[asyncio.Task[None], CosyEventHandler] = {}

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = CosyEventHandler(reader, writer, gw)
        task = asyncio.create_task(handler.run(), name="cosy wyoming connection")
        connections[task] = handler
        task.add_done_callback(lambda done: connections.pop(done, None))

    parsed = urlparse(config.uri)
    unix_path = Path(parsed.path) if parsed.scheme == "unix" else None
    if unix_path is not None:
        unix_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(connected, path=str(unix_path))
    else:
        host, port = parse_uri(config.uri)
        server = await asyncio.start_server(connected, host=host, port=port)
    log.info("cosy wyoming server on %s (broker %s)", config.uri, gw.bridge.endpoints.front)
    try:
        await stop.wait()
        server.close()
        busy = [h for h in connections.values() if h._open]
        log.info("stopping: %d connection(s) synthesizing get up to %g s to finish", len(busy), STOP_GRACE_S)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(h._open for h in connections.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        tasks = list(connections)
        for task in tasks:
            task.cancel()  # the handler's disconnect() cancels what it still had open
        await asyncio.gather(*tasks, return_exceptions=True)
        server.close()
        if unix_path is not None:
            unix_path.unlink(missing_ok=True)
        log.info("cosy wyoming stopped")


def run_wyoming(endpoints: Endpoints, config: WyomingConfig) -> int:
    try:
        asyncio.run(serve(endpoints, config))
    except KeyboardInterrupt:
        return 130
    return 0
