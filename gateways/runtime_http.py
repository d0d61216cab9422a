"""The official CosyVoice runtime's HTTP routes (``runtime/python/fastapi`` upstream), served by `cosy http`.

  GET|POST /inference_sft            form tts_text, spk_id
  GET|POST /inference_zero_shot      form tts_text, prompt_text, file prompt_wav
  GET|POST /inference_cross_lingual  form tts_text, file prompt_wav
  GET|POST /inference_instruct       form tts_text, spk_id, instruct_text
  GET|POST /inference_instruct2      form tts_text, instruct_text, file prompt_wav

As upstream, the fields come as a form (multipart or urlencoded) in the body, also with GET, which is what the
official client sends; a field missing from the body is looked for in the query string. The reply streams raw
signed 16-bit little-endian mono PCM at the model's rate as the worker produces it (``X-Sample-Rate`` says the
rate). ``prompt_wav`` is any audio libsndfile or FFmpeg decodes (WAV, FLAC, Ogg, MP3, M4A...; at most
:data:`MAX_UPLOAD_BYTES`), mixed to mono and resampled to 16 kHz for the job's own prompt (:mod:`.cloning`, as
the OpenAI routes' uploads); 0.5-30 s of it.

Errors come before any audio, as JSON in FastAPI's shape: ``{"detail": MESSAGE, "code": CODE}`` (a missing field:
422 with FastAPI's list of ``{loc, msg, type}``), with the statuses of :data:`HTTP_STATUS`; a failure after the
first audio cuts the response without its final chunk. With ``--api-key`` these routes want the key too
(``Authorization: Bearer KEY``). :func:`routes` gives them to `cosy http`'s app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosy import protocol as P
from cosy.gateways import cloning, forms
from cosy.gateways import jobstream as js
from cosy.gateways import runtime as rt
from cosy.gateways.bridge import GatewayError
from cosy.gateways.http import AudioStreamResponse, HttpGateway  # http.create_app imports this module when it runs

log = logging.getLogger("cosy.http")

API = "cosyvoice"
MAX_UPLOAD_BYTES = 16 << 20  # the whole form: 30 s of 48 kHz stereo 32-bit float is 11.5 MB
PROMPT_RATE = P.PROMPT_RATE
MIN_PROMPT_S = P.MIN_PROMPT_BYTES / 2 / PROMPT_RATE
MAX_PROMPT_S = P.MAX_PROMPT_BYTES / 2 / PROMPT_RATE

# path -> (mode, the form fields it requires; prompt_wav is a file)
ROUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "/inference_sft": ("sft", ("tts_text", "spk_id")),
    "/inference_zero_shot": ("zero_shot", ("tts_text", "prompt_text", "prompt_wav")),
    "/inference_cross_lingual": ("cross_lingual", ("tts_text", "prompt_wav")),
    "/inference_instruct": ("instruct", ("tts_text", "spk_id", "instruct_text")),
    "/inference_instruct2": ("instruct2", ("tts_text", "instruct_text", "prompt_wav")),
}
HTTP_STATUS = {
    rt.INVALID: 400, rt.NOT_FOUND: 404, rt.PRECONDITION: 400, rt.UNAVAILABLE: 503, rt.BUSY: 503,
    rt.TIMEOUT: 504, rt.CANCELLED: 499, rt.ABORTED: 502, rt.INTERNAL: 500,
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.extra = extra or {}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse({"detail": self.message, "code": self.code, **self.extra}, status_code=self.status,
                            headers=headers)


class MissingFields(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__(", ".join(names))
        self.names = names

    def response(self) -> JSONResponse:
        detail = [{"type": "missing", "loc": ["body", name], "msg": "Field required", "input": None}
                  for name in self.names]
        return JSONResponse({"detail": detail}, status_code=422)


def runtime_error(err: rt.RuntimeRequestError, retry_after: int) -> HttpError:
    status = HTTP_STATUS[err.kind]
    extra = {"voices": err.voices} if err.voices else None
    return HttpError(status, err.message, err.code, retry_after if status == 503 else None, extra)


# --- the prompt audio -------------------------------------------------------------------------


def prompt_pcm(data: bytes) -> bytes:
    """An uploaded recording as the job's prompt: 16 kHz mono s16le, 0.5-30 s; HttpError(400) otherwise."""
    try:
        mono, rate = cloning.decode_upload(data, field="prompt_wav", min_s=MIN_PROMPT_S, max_s=MAX_PROMPT_S,
                                           silent=cloning.SILENT)
    except cloning.UploadError as exc:
        raise HttpError(400, exc.message, "BAD_AUDIO" if exc.code == "invalid_audio" else "BAD_PROMPT") from None
    return cloning.resample_to_prompt(mono, rate)


# --- the form --------------------------------------------------------------------------------------


async def read_form(request: Request, wanted: tuple[str, ...]) -> dict[str, str | bytes]:
    """The wanted fields from the body's form (then the query string): text as str, prompt_wav's bytes."""
    try:
        fields = await forms.read_form(request, wanted, limit=MAX_UPLOAD_BYTES, max_files=2, max_fields=16)
    except forms.FormError as exc:
        if exc.status == 413:
            raise HttpError(413, f"{exc.message} (a prompt is at most {MAX_PROMPT_S:g} s)",
                            "REQUEST_TOO_LARGE") from None
        raise HttpError(exc.status, exc.message, "BAD_FORM") from None
    for name in wanted:
        if name not in fields and name in request.query_params and name != "prompt_wav":
            fields[name] = request.query_params[name]
    if isinstance(fields.get("prompt_wav"), str):
        raise HttpError(400, "prompt_wav must be an uploaded file (multipart/form-data)", "BAD_FORM")
    missing = [name for name in wanted if name not in fields]
    if missing:
        raise MissingFields(missing)
    return fields


async def runtime_request(mode: str, fields: dict[str, str | bytes]) -> rt.RuntimeRequest:
    def text(name: str) -> str:
        value = fields.get(name, "")
        return value if isinstance(value, str) else ""

    prompt = b""
    wav = fields.get("prompt_wav")
    if isinstance(wav, bytes):
        prompt = await asyncio.to_thread(prompt_pcm, wav)
    return rt.RuntimeRequest(mode, text("tts_text"), spk_id=text("spk_id"), prompt_text=text("prompt_text"),
                             prompt_audio=prompt, instruct=text("instruct_text"))


# --- the routes -----------------------------------------------------------------------------------


class RuntimeRoutes:
    """The five routes of one `cosy http` gateway."""

    def __init__(self, gateway: HttpGateway) -> None:
        self.gw = gateway

    def handler(self, mode: str, wanted: tuple[str, ...]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self.inference(request, mode, wanted)

        return endpoint

    async def inference(self, request: Request, mode: str, wanted: tuple[str, ...]) -> Response:
        cfg = self.gw.config
        try:
            if not rt.bearer_ok(request.headers.get("authorization", ""), cfg.api_key):
                raise HttpError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "INVALID_API_KEY")
            fields = await read_form(request, wanted)
            stream = await self._open(await runtime_request(mode, fields))
            try:
                rate = await stream.start(request.is_disconnected)
            except js.JobError as err:
                raise runtime_error(rt.RuntimeRequestError.from_job(err), cfg.retry_after_s) from None
        except (HttpError, MissingFields) as err:
            self._count(str(err.status) if isinstance(err, HttpError) else "422")
            return err.response()
        self._count("200")
        headers = {"X-Cosy-Job": stream.job, "X-Sample-Rate": str(rate), "X-Sample-Format": "s16le",
                   "X-Channels": "1", "Cache-Control": "no-store"}
        return AudioStreamResponse(self._body(stream), media_type="application/octet-stream", headers=headers)

    async def _open(self, request: rt.RuntimeRequest) -> js.JobStream:
        cfg = self.gw.config
        try:
            request.validate()
            try:
                snap = await self.gw.bridge.status()
            except GatewayError as exc:
                raise rt.RuntimeRequestError(rt.UNAVAILABLE, str(exc), js.BROKER_UNREACHABLE) from None
            spec = request.job_spec(snap, cfg.priority, prefix="http")
            return await js.open_stream(self.gw.bridge, spec, timeout_s=cfg.timeout_s, split=cfg.split,
                                        metrics=self.gw.metrics, api=API)
        except rt.RuntimeRequestError as err:
            raise runtime_error(err, cfg.retry_after_s) from None
        except js.JobError as err:
            raise runtime_error(rt.RuntimeRequestError.from_job(err), cfg.retry_after_s) from None

    async def _body(self, stream: js.JobStream) -> AsyncIterator[bytes]:
        """The PCM as it comes; a StreamAborted leaves it, so the response ends without its final chunk."""
        try:
            async with contextlib.aclosing(stream.audio()) as chunks:
                async for data in chunks:
                    yield data
        finally:
            if stream.cancel():
                self.gw.metrics.disconnects.labels(API).inc()
                log.info("job %s: the client went away after %d samples; cancelled", stream.job,
                         stream.samples_sent)

    def _count(self, status: str) -> None:
        self.gw.metrics.requests.labels(API, status).inc()


def routes(gateway: HttpGateway) -> list[Route]:
    """The official runtime's routes for `cosy http`'s app (GET and POST each)."""
    r = RuntimeRoutes(gateway)
    return [Route(path, r.handler(mode, wanted), methods=["GET", "POST"]) for path, (mode, wanted) in ROUTES.items()]
