"""`cosy http`: an OpenAI-compatible speech API in front of the broker (Starlette + uvicorn).

  POST /v1/audio/speech   {model, input, voice, instructions, response_format, speed, stream_format}
                          audio streamed with chunked transfer as the worker produces it (also /audio/speech)
  GET  /v1/audio/voices   served voices, registry voices a worker can clone, the aliases and what they resolve to
  POST /v1/audio/voices   add a voice to the registry (multipart: name, audio_sample, consent, transcript, language)
  GET  /v1/audio/models   Open WebUI's model list (both GETs without the API key: Open WebUI lists without it)
  GET  /v1/models         the models this gateway answers to
  GET  /healthz           the process is up
  GET  /readyz            the broker answers and at least one worker is connected
  GET  /metrics           Prometheus text format

Every request is a job on the broker; the gateway is an ordinary broker client (see
:mod:`cosy.gateways.bridge`). Response headers are sent when the first audio arrives, so
anything that fails before then (unknown voice, full queue, engine error, timeout) is an
HTTP error in OpenAI's error shape; what fails after it aborts the response (no final
chunk), never a silently short file. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cosy import protocol as P
from cosy.client import JobSpec
from cosy.encode import (
    OPENAI_PCM_RATE,
    RESPONSE_FORMATS,
    StreamEncoder,
    available_formats,
    make_encoder,
    why_unavailable,
)
from cosy.endpoints import Endpoints
from cosy.gateways import cloning
from cosy.gateways import jobstream as js
from cosy.gateways.bridge import BrokerBridge, GatewayError, StatusSnapshot
from cosy.gateways.voice_names import Resolved, alias_table, resolve
from cosy.metrics import GatewayMetrics
from cosy.voices import Voice, shipped_dir, user_dir

log = logging.getLogger("cosy.http")

API = "openai"
MAX_BODY = 1 << 20
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
STREAM_FORMATS = ("audio", "sse")
MAX_INSTRUCTIONS = 4096  # OpenAI's limit


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    timeout_s: float = 60.0  # longest wait for the first audio, and between two chunks
    pcm_rate: int | None = OPENAI_PCM_RATE  # None: the voice's native rate
    retry_after_s: int = 2
    priority: str = P.INTERACTIVE
    voice_aliases: dict[str, str] = field(default_factory=dict)  # see gateways/voice_names.py
    split: bool = True  # long texts as sentence jobs across the workers (gateways/segments.py)
    voices_dir: Path | None = None  # where POST /v1/audio/voices stores voices [default: voices.user_dir()]

    @property
    def registry_dirs(self) -> list[Path]:
        return [self.voices_dir or user_dir(), shipped_dir()]


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.kind = kind
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# --- the request --------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str | None
    response_format: str
    speed: float
    stream_format: str
    model: str
    instructions: str = ""


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ApiError(400, f"'{name}' must be a {kind.__name__}", "invalid_type", name)
    return value


def parse_speech(body: Any, formats: list[str]) -> SpeechRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request")
    text = _field(body, "input", str, None)
    if text is None:
        raise ApiError(400, "'input' is required", "missing_required_parameter", "input")
    if not text.strip():
        raise ApiError(400, "'input' is empty", "empty_input", "input")
    if len(text) > P.MAX_TEXT_CHARS:
        raise ApiError(400, f"'input' is {len(text)} characters; the limit is {P.MAX_TEXT_CHARS}",
                       "string_above_max_length", "input")
    model = _field(body, "model", str, "tts-1")
    voice = body.get("voice")
    if isinstance(voice, dict):  # the openai SDK's custom voice: {"id": "..."}
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise ApiError(400, "'voice' as an object needs a string 'id'", "invalid_type", "voice")
    elif voice is not None and not isinstance(voice, str):
        raise ApiError(400, "'voice' must be a string or an object {\"id\": ...}", "invalid_type", "voice")
    voice = voice.strip() if voice else None
    instructions = _field(body, "instructions", str, "")
    if len(instructions) > MAX_INSTRUCTIONS:
        raise ApiError(400, f"'instructions' is {len(instructions)} characters; the limit is {MAX_INSTRUCTIONS}",
                       "string_above_max_length", "instructions")
    fmt = _field(body, "response_format", str, "mp3").lower()
    if fmt not in formats:
        why = "is not available"
        if fmt in RESPONSE_FORMATS:
            why = why_unavailable(fmt)
        raise ApiError(400, f"response_format {fmt!r} {why}; use one of {', '.join(formats)}",
                       "unsupported_response_format", "response_format")
    speed = float(_field(body, "speed", float, 1.0))
    if not 0.25 <= speed <= 4.0:
        raise ApiError(400, f"'speed' {speed:g} is outside 0.25-4.0", "invalid_speed", "speed")
    stream_format = _field(body, "stream_format", str, "audio")
    if stream_format not in STREAM_FORMATS:
        raise ApiError(400, f"'stream_format' must be one of {', '.join(STREAM_FORMATS)}", "invalid_value",
                       "stream_format")
    return SpeechRequest(text, voice or None, fmt, speed, stream_format, model, instructions.strip())


def job_error(err: js.JobError, retry_after: int) -> ApiError:
    """A job stream's error before the first audio, as OpenAI's error."""
    code, message = err.code, err.message
    if code == P.UNKNOWN_VOICE:
        return ApiError(404, message, "voice_not_found", "voice")
    if code == P.TEXT_TOO_LONG:
        return ApiError(400, message, "string_above_max_length", "input")
    if code == P.BAD_REQUEST:
        return ApiError(400, message, "invalid_request")
    if code == P.CANNOT_CLONE:
        return ApiError(400, message, "cannot_clone", "voice")
    if code == js.TIMEOUT:
        return ApiError(504, message, "timeout", kind="server_error")
    if code == js.CLIENT_CLOSED:
        return ApiError(499, message, "client_closed")
    if code == js.NO_AUDIO:
        return ApiError(500, message, "no_audio", kind="server_error")
    if code in (P.WORKER_LOST, js.INCOMPLETE_AUDIO):
        return ApiError(502, message, code.lower(), kind="server_error")
    unavailable = {P.BUSY: "queue_full", P.SHUTTING_DOWN: "shutting_down", js.NO_WORKERS: "no_workers",
                   js.BROKER_UNREACHABLE: "broker_unreachable"}
    if code in unavailable:
        return ApiError(503, message, unavailable[code], kind="server_error", retry_after=retry_after)
    if code in (js.GATEWAY_STOPPED, P.CLIENT_GONE, P.CANCELLED):
        return ApiError(503, message, code.lower(), kind="server_error", retry_after=retry_after)
    return ApiError(500, message, code.lower(), kind="server_error")


# --- the gateway ----------------------------------------------------------------------------


class HttpGateway:
    def __init__(self, endpoints: Endpoints, config: HttpConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.bridge = BrokerBridge(endpoints)
        self.metrics.broker.source = lambda: (self.bridge.snapshot().status, self.bridge.broker_up)
        self.formats = [f for f in available_formats() if f in RESPONSE_FORMATS]

    # --- auth -------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        key = self.config.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key",
                           kind="authentication_error")

    # --- routes -----------------------------------------------------------------------

    async def speech(self, request: Request) -> Response:
        t0 = time.monotonic()
        try:
            self.check_auth(request)
            req = parse_speech(await self._json(request), self.formats)
            stream = await self._open(req, t0)
            try:
                rate = await stream.start(request.is_disconnected)
            except js.JobError as err:
                raise job_error(err, self.config.retry_after_s) from None
        except ApiError as err:
            self.metrics.requests.labels(API, str(err.status)).inc()
            return err.response()
        self.metrics.requests.labels(API, "200").inc()
        encoder = make_encoder(req.response_format, rate, self.config.pcm_rate)
        headers = {"X-Cosy-Job": stream.job, "X-Sample-Rate": str(encoder.sample_rate), "Cache-Control": "no-store"}
        body = self._stream(stream, encoder)
        if req.stream_format == "sse":
            return AudioStreamResponse(_sse(body, stream), media_type="text/event-stream", headers=headers)
        if req.response_format == "pcm":
            headers.update({"X-Sample-Format": "s16le", "X-Channels": "1"})
        return AudioStreamResponse(body, media_type=encoder.content_type, headers=headers)

    async def models(self, request: Request) -> Response:
        try:
            self.check_auth(request)
        except ApiError as err:
            return err.response()
        snap = self.bridge.snapshot()
        ids = ["cosy", *MODEL_ALIASES]
        for w in snap.workers:
            for name in (w.get("engine"), w.get("model")):
                if name and name not in ids:
                    ids.append(str(name))
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "cosy"} for i in ids]
        return JSONResponse({"object": "list", "data": data})

    async def audio_models(self, request: Request) -> Response:
        """Open WebUI's model list for a custom OpenAI TTS endpoint (no API key needed: it lists without one)."""
        return JSONResponse({"models": [{"id": i, "name": i} for i in ("cosy", *MODEL_ALIASES)]})

    async def voices(self, request: Request) -> Response:
        """Served voices, registry voices a connected worker can clone, then every alias with the voice it resolves
        to now. No API key needed (Open WebUI lists without one); it shows voice names only."""
        try:
            snap = await self.bridge.status()
        except GatewayError as exc:
            return ApiError(503, str(exc), "broker_unreachable", kind="server_error",
                            retry_after=self.config.retry_after_s).response()
        default = snap.default_voice()
        served: dict[str, list[str]] = {}
        for w in snap.workers:
            for v in w.get("voices", []):
                served.setdefault(v, []).append(str(w.get("name", "")))
        voices: list[dict[str, Any]] = [{"id": v, "name": v, "default": v == default, "workers": served[v]}
                                        for v in sorted(served)]
        if cloning.cloning_workers(snap.workers):
            voices += [{"id": v.name, "name": v.name, "registry": True} for v in self._registry()
                       if v.name not in served]
        aliases = alias_table(self.config.voice_aliases, sorted(served), default)
        return JSONResponse({"voices": voices + aliases})

    async def create_voice(self, request: Request) -> Response:
        """POST /v1/audio/voices: gateways/voice_upload.py."""
        from cosy.gateways.voice_upload import create_voice

        return await create_voice(self, request)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        try:
            snap = await self.bridge.status()
        except GatewayError as exc:
            return JSONResponse({"ready": False, "reason": str(exc)}, status_code=503)
        if not snap.workers:
            return JSONResponse({"ready": False, "reason": "no workers are connected"}, status_code=503)
        return JSONResponse({"ready": True, "workers": len(snap.workers), "voices": snap.voices})

    async def prometheus(self, request: Request) -> Response:
        try:
            self.check_auth(request)
        except ApiError as err:
            return err.response()
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # --- the speech path -----------------------------------------------------------------

    @staticmethod
    async def _json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", "request_too_large")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", "request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_json") from None

    def _registry(self) -> list[Voice]:
        from cosy.voices import list_voices

        return list_voices(self.config.registry_dirs)

    def resolve_voice(self, name: str | None, snap: StatusSnapshot) -> Resolved:
        """The voice a request names (gateways/voice_names.py); the registry is read only when needed."""
        return resolve(name, self.config.voice_aliases, snap.voices, snap.default_voice(),
                       lambda n: cloning.registry_voice(n, self.config.registry_dirs))

    async def _status(self) -> StatusSnapshot:
        try:
            return await self.bridge.status()
        except GatewayError as exc:
            raise ApiError(503, str(exc), "broker_unreachable", kind="server_error",
                           retry_after=self.config.retry_after_s) from None

    async def _open(self, req: SpeechRequest, t0: float) -> js.JobStream:
        resolved = self.resolve_voice(req.voice, await self._status())
        spec = JobSpec(text=req.text, voice=resolved.voice, speed=req.speed, priority=self.config.priority,
                       instruct=req.instructions)
        if resolved.registry is not None:  # no worker serves it by name yet: the job brings it as its own prompt
            try:
                spec.prompt_audio = await asyncio.to_thread(cloning.prompt_audio, resolved.registry)
            except Exception as exc:  # soundfile's errors, OSError: a registry voice whose audio cannot be read
                raise ApiError(500, f"voice {resolved.voice!r}: its reference audio cannot be read ({exc})",
                               "voice_unreadable", "voice", kind="server_error") from None
            spec.prompt_text = resolved.registry.transcript
        spec.job = f"http-{spec.job}"
        try:
            return await js.open_stream(self.bridge, spec, timeout_s=self.config.timeout_s, split=self.config.split,
                                        metrics=self.metrics, api=API, t0=t0)
        except js.JobError as err:
            raise job_error(err, self.config.retry_after_s) from None

    async def _stream(self, stream: js.JobStream, encoder: StreamEncoder) -> AsyncIterator[bytes]:
        """The encoded audio; a StreamAborted leaves it, so the response ends without its final chunk."""
        try:
            async with contextlib.aclosing(stream.audio()) as chunks:
                async for data in chunks:
                    out = encoder.encode(np.frombuffer(data, dtype="<i2"))
                    if out:
                        yield out
            yield encoder.finish()
        finally:
            if stream.cancel():
                self.metrics.disconnects.labels(API).inc()
                log.info("job %s: the client went away after %d samples; cancelled", stream.job, stream.samples_sent)


class AudioStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a job is cancelled when the client leaves."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _sse(body: AsyncIterator[bytes], stream: js.JobStream) -> AsyncIterator[bytes]:
    """OpenAI's stream_format=sse: speech.audio.delta events with base64 audio, then speech.audio.done with
    ``usage`` (see :meth:`cosy.gateways.jobstream.StreamTotals.usage`)."""
    async with contextlib.aclosing(body) as parts:
        async for data in parts:
            if data:
                event = {"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()}
                yield f"data: {json.dumps(event)}\n\n".encode()
    assert stream.totals is not None  # the body ended normally: the job is complete
    done = {"type": "speech.audio.done", "usage": stream.totals.usage()}
    yield f"data: {json.dumps(done)}\n\n".encode()


# --- the app and the process ----------------------------------------------------------------


def create_app(endpoints: Endpoints, config: HttpConfig, metrics: GatewayMetrics | None = None) -> Starlette:
    gw = HttpGateway(endpoints, config, metrics)

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        gw.bridge.start()
        log.info("cosy http gateway on http://%s:%d (broker %s); formats %s", config.host, config.port,
                 endpoints.front, ", ".join(gw.formats))
        try:
            yield
        finally:
            gw.bridge.stop()

    routes = [Route("/v1/models", gw.models, methods=["GET"])]
    for base in ("/v1/audio", "/audio"):  # clients configured with the bare path get the same routes
        routes += [
            Route(f"{base}/speech", gw.speech, methods=["POST"]),
            Route(f"{base}/models", gw.audio_models, methods=["GET"]),
            Route(f"{base}/voices", gw.voices, methods=["GET"]),
            Route(f"{base}/voices", gw.create_voice, methods=["POST"]),
        ]
    routes += [
        Route("/healthz", gw.healthz, methods=["GET"]),
        Route("/readyz", gw.readyz, methods=["GET"]),
        Route("/metrics", gw.prometheus, methods=["GET"]),
    ]
    from cosy.gateways import runtime_http  # the official CosyVoice runtime's routes (it imports this module)
    routes += runtime_http.routes(gw)
    app = Starlette(routes=routes, lifespan=_lifespan_context(lifespan))
    app.state.gateway = gw
    return app


def _lifespan_context(fn: Any) -> Any:
    return contextlib.asynccontextmanager(fn)


def run_http(endpoints: Endpoints, config: HttpConfig, log_level: str = "info") -> int:
    import uvicorn

    app = create_app(endpoints, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level.lower(), access_log=False,
                timeout_graceful_shutdown=5, server_header=False)
    return 0
