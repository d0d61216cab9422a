"""A bounded form from a request's body, for the routes that take uploads (``POST /v1/audio/voices``, the
official ``/inference_*`` routes).

:func:`read_form` reads at most ``limit`` bytes (a ``Content-Length`` over it is refused before anything is
read), parses the body as multipart/form-data or urlencoded with bounded parts, and gives the wanted fields: text
as ``str``, files as their ``bytes``. :class:`FormError` carries the status (413: too large; 400: not a form, or
one that does not parse); each route words it in its own API's error shape.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class FormError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, limit: int) -> bytes:
    too_big = FormError(413, f"the request body is over {limit} bytes")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


async def read_form(request: Request, wanted: tuple[str, ...], *, limit: int, max_files: int = 1,
                    max_fields: int = 16, need_form: bool = False) -> dict[str, str | bytes]:
    """The wanted fields present in the body's form ({} for an empty body); with ``need_form``, a body that is not
    declared a form (its Content-Type) is FormError(400)."""
    body = await read_body(request, limit)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if need_form and kind not in FORM_TYPES:
        raise FormError(400, f"the body is not a form (multipart/form-data or urlencoded) but {kind or 'untyped'}")
    if not body:
        return {}

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_fields)
    except Exception as exc:  # a broken multipart body, a missing boundary, too many parts
        raise FormError(400, f"the form could not be parsed: {exc}") from None
    fields: dict[str, str | bytes] = {}
    try:
        for name in wanted:
            value = form.get(name)
            if isinstance(value, UploadFile):
                fields[name] = await value.read()
            elif value is not None:
                fields[name] = str(value)
    finally:
        await form.close()
    return fields
