"""``POST /v1/audio/voices``: OpenAI's voice creation, into cosy's voice registry (:mod:`cosy.voices`).

Multipart form: ``name`` (required; a registry name, a-z 0-9 _ -), ``audio_sample`` (required; a file of
3-30 s in any container libsndfile or FFmpeg decodes), ``consent`` (optional, OpenAI's consent id: kept in the
voice's description), and cosy's own ``transcript`` (optional: the recording's exact words; without them the
voice clones cross-lingually, the voice without its words) and ``language``. Answers
``{"object": "audio.voice", "id": NAME, "name": NAME, "created_at": UNIX_TIME}``; ``voice`` (or
``voice: {"id": NAME}``) in the next speech request uses it.

Checks, in order, each a clear OpenAI error with nothing stored: the API key (401), the upload's size (413 over
:data:`MAX_UPLOAD_BYTES`), a parsable form (400 ``invalid_form``), the required fields (400
``missing_required_parameter``), the name (400 ``invalid_voice_name``; 409 ``voice_exists`` when a served
voice, an alias, OpenAI's names or the registry has it), the transcript's length, the audio (400
``invalid_audio``, ``audio_too_short``, ``audio_too_long``, ``silent_audio``), then that a connected worker
can clone (503 ``no_workers``; 400 ``cannot_clone`` naming the engines that can). The voice is written
atomically (:func:`cosy.voices.store_voice`): when the registry's disk is full (or over quota, or read-only) the
answer is 507 ``insufficient_storage`` ("no space left on DEVICE writing the voice NAME; nothing was added"), and
any other write error a 500 ``storage_error``; either way nothing is stored.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cosy import protocol as P
from cosy.gateways import cloning, forms
from cosy.gateways.voice_names import OPENAI_VOICES
from cosy.voices import NoSpaceError, VoiceError, check_name, store_voice

if TYPE_CHECKING:
    from cosy.gateways.http import HttpGateway

MAX_UPLOAD_BYTES = 16 << 20  # 30 s of 48 kHz stereo float WAV is 11.5 MB
FIELDS = ("name", "audio_sample", "consent", "transcript", "language")


async def read_form(request: Request) -> dict[str, str | bytes]:
    """The form's known fields: text as str, audio_sample's bytes."""
    from cosy.gateways.http import ApiError

    try:
        return await forms.read_form(request, FIELDS, limit=MAX_UPLOAD_BYTES, max_files=1, max_fields=len(FIELDS),
                                     need_form=True)
    except forms.FormError as exc:
        if exc.status == 413:
            raise ApiError(413, f"the upload is over {MAX_UPLOAD_BYTES} bytes", "request_too_large") from None
        raise ApiError(400, f"send the voice as multipart/form-data (name, audio_sample, ...): {exc.message}",
                       "invalid_form") from None


def _text(fields: dict[str, str | bytes], name: str) -> str:
    from cosy.gateways.http import ApiError

    value = fields.get(name, "")
    if isinstance(value, bytes):
        raise ApiError(400, f"'{name}' must be a text field, not a file", "invalid_type", name)
    return value.strip()


async def create_voice(gw: HttpGateway, request: Request) -> Response:
    from cosy.gateways.http import API, ApiError

    try:
        gw.check_auth(request)
        fields = await read_form(request)
        for required in ("name", "audio_sample"):
            if not fields.get(required):
                raise ApiError(400, f"'{required}' is required", "missing_required_parameter", required)
        name = _text(fields, "name")
        audio = fields["audio_sample"]
        if not isinstance(audio, bytes):
            raise ApiError(400, "'audio_sample' must be an uploaded file", "invalid_type", "audio_sample")
        transcript, language, consent = (_text(fields, f) for f in ("transcript", "language", "consent"))
        try:
            check_name(name)
        except VoiceError as exc:
            raise ApiError(400, str(exc), "invalid_voice_name", "name") from None
        snap = await gw._status()
        taken = set(snap.voices) | set(OPENAI_VOICES) | set(gw.config.voice_aliases)
        if name in taken or cloning.registry_voice(name, gw.config.registry_dirs) is not None:
            raise ApiError(409, f"a voice named {name!r} exists (served, an alias, or in the registry)",
                           "voice_exists", "name")
        if len(transcript) > P.MAX_PROMPT_TEXT:
            raise ApiError(400, f"'transcript' is {len(transcript)} characters; the limit is {P.MAX_PROMPT_TEXT}",
                           "string_above_max_length", "transcript")
        try:
            mono, rate = await asyncio.to_thread(cloning.decode_upload, audio)
        except cloning.UploadError as exc:
            raise ApiError(400, exc.message, exc.code, "audio_sample") from None
        if not snap.workers:
            raise ApiError(503, "no workers are connected to the broker", "no_workers", kind="server_error",
                           retry_after=gw.config.retry_after_s)
        if not cloning.cloning_workers(snap.workers):
            raise ApiError(400, cloning.cannot_clone_message(snap.workers), "cannot_clone")
        description = f"added over HTTP; consent: {consent}" if consent else "added over HTTP"
        try:
            await asyncio.to_thread(store_voice, name, mono, rate, transcript, language, "", description,
                                    gw.config.voices_dir)
        except VoiceError as exc:
            exists = "exists" in str(exc)
            raise ApiError(409 if exists else 400, str(exc), "voice_exists" if exists else "silent_audio",
                           "name" if exists else "audio_sample") from None
        except NoSpaceError as exc:
            raise ApiError(507, str(exc), "insufficient_storage", kind="server_error") from None
        except OSError as exc:
            raise ApiError(500, f"cannot store the voice {name}: {exc.strerror or exc}; nothing was added",
                           "storage_error", kind="server_error") from None
    except ApiError as err:
        gw.metrics.requests.labels(API, str(err.status)).inc()
        return err.response()
    gw.metrics.requests.labels(API, "200").inc()
    return JSONResponse({"object": "audio.voice", "id": name, "name": name, "created_at": int(time.time())})
