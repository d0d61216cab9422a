"""The official CosyVoice runtime's requests as cosy jobs: what `cosy grpc` and the runtime routes of `cosy http`
(:mod:`cosy.gateways.runtime_http`) share. Nothing here knows gRPC or HTTP.

The official runtime (``runtime/python/grpc`` and ``runtime/python/fastapi`` upstream) has five modes; each
becomes one :class:`cosy.client.JobSpec`:

=================  ==========================================  =================================================
mode               the request                                 the job
=================  ==========================================  =================================================
``sft``            ``tts_text``, ``spk_id``                    ``voice = spk_id`` (a voice the workers serve)
``zero_shot``      ``tts_text``, ``prompt_text``, prompt audio ``prompt_audio`` + ``prompt_text`` (its own voice)
``cross_lingual``  ``tts_text``, prompt audio                  ``prompt_audio``, ``prompt_text = ""``
``instruct``       ``tts_text``, ``spk_id``, ``instruct_text`` ``voice = spk_id`` + ``instruct``
``instruct2``      ``tts_text``, ``instruct_text``, audio      ``prompt_audio`` + ``instruct`` (HTTP only, as
                                                               upstream)
=================  ==========================================  =================================================

The prompt audio is 16 kHz mono signed 16-bit little-endian PCM, 0.5-30 s (PROTOCOL.md, SUBMIT). Jobs with their
own prompt go only to workers that clone (the broker answers ``CANNOT_CLONE`` otherwise, naming the engines that
can); instruct modes need a worker whose engine follows a job's instruct (its READY says ``instruct``).

Errors are :class:`RuntimeRequestError` with one of the :data:`KINDS`, which each gateway turns into its own
status: :func:`kind_of` classifies the job stream's codes (:mod:`cosy.gateways.jobstream`) the same way.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cosy import protocol as P
from cosy.client import JobSpec
from cosy.gateways import jobstream as js
from cosy.gateways.bridge import StatusSnapshot

MODES = ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2")
PROMPT_MODES = ("zero_shot", "cross_lingual", "instruct2")
VOICE_MODES = ("sft", "instruct")
INSTRUCT_MODES = ("instruct", "instruct2")
# Workers whose READY says `instruct` follow a job's instruction (PROTOCOL.md, SUBMIT `instruct`); the others
# ignore it, so an instruct request for a voice only they serve is refused rather than answered in the plain voice.
KNOWN_INSTRUCT_ENGINES = ("cosyvoice",)  # named in the refusal when no connected worker has an instruct mode
MAX_INSTRUCT_CHARS = 1000

# What went wrong, independent of the protocol; each gateway maps these to its statuses.
INVALID = "invalid"  # the request itself: empty text, malformed or oversized prompt, bad field
NOT_FOUND = "not_found"  # the spk_id is no served voice
PRECONDITION = "precondition"  # nothing connected can do this mode (no cloning worker, no instruct mode)
UNAVAILABLE = "unavailable"  # no broker, no workers, the gateway is stopping: try again later
BUSY = "busy"  # the queue is full: try again later
TIMEOUT = "timeout"  # no audio in time
CANCELLED = "cancelled"  # the client went away, or the job was cancelled
ABORTED = "aborted"  # the audio already sent cannot be completed (a worker was lost mid-stream)
INTERNAL = "internal"  # the engine failed, or produced nothing
KINDS = (INVALID, NOT_FOUND, PRECONDITION, UNAVAILABLE, BUSY, TIMEOUT, CANCELLED, ABORTED, INTERNAL)

_KIND_OF_CODE = {
    P.BAD_REQUEST: INVALID, P.TEXT_TOO_LONG: INVALID,
    P.UNKNOWN_VOICE: NOT_FOUND,
    P.CANNOT_CLONE: PRECONDITION,
    P.BUSY: BUSY,
    js.BROKER_UNREACHABLE: UNAVAILABLE, js.NO_WORKERS: UNAVAILABLE, P.SHUTTING_DOWN: UNAVAILABLE,
    js.GATEWAY_STOPPED: UNAVAILABLE, P.WORKER_LOST: UNAVAILABLE,
    js.TIMEOUT: TIMEOUT,
    js.CLIENT_CLOSED: CANCELLED, P.CANCELLED: CANCELLED, P.CLIENT_GONE: CANCELLED,
    js.RESTARTED: ABORTED, js.INCOMPLETE_AUDIO: ABORTED,
}


def kind_of(code: str) -> str:
    """The kind of a job stream's error code (the broker's codes and jobstream's own)."""
    return _KIND_OF_CODE.get(code, INTERNAL)


class RuntimeRequestError(Exception):
    """A request that cannot become a job, or a job that failed: ``kind`` (one of KINDS), ``code``, ``message``."""

    def __init__(self, kind: str, message: str, code: str = "", voices: list[str] | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.code = code or kind.upper()
        self.voices = list(voices or [])

    @classmethod
    def from_job(cls, err: js.JobError) -> RuntimeRequestError:
        return cls(kind_of(err.code), err.message, err.code, err.voices)


@dataclass(frozen=True)
class RuntimeRequest:
    """One request of the official runtime, whichever the protocol it came in."""

    mode: str
    text: str
    spk_id: str = ""
    prompt_text: str = ""
    prompt_audio: bytes = b""  # 16 kHz mono s16le
    instruct: str = ""

    def validate(self) -> None:
        """What can be checked without the broker; raises RuntimeRequestError(INVALID)."""
        if self.mode not in MODES:
            raise RuntimeRequestError(INVALID, f"unknown mode {self.mode!r}; one of {', '.join(MODES)}")
        if not self.text.strip():
            raise RuntimeRequestError(INVALID, "tts_text is empty", "EMPTY_TEXT")
        if len(self.text) > P.MAX_TEXT_CHARS:
            raise RuntimeRequestError(INVALID, f"tts_text is {len(self.text)} characters; the limit is "
                                               f"{P.MAX_TEXT_CHARS}", P.TEXT_TOO_LONG)
        if self.mode in PROMPT_MODES:
            if not self.prompt_audio:
                raise RuntimeRequestError(INVALID, f"{self.mode} needs the prompt audio (16 kHz mono 16-bit PCM)",
                                          "NO_PROMPT")
            if self.mode == "zero_shot" and not self.prompt_text.strip():
                raise RuntimeRequestError(INVALID, "zero_shot needs prompt_text, the words of the prompt audio; "
                                                   "without them, send a cross_lingual request", "NO_PROMPT_TEXT")
            try:
                P.check_prompt(self.prompt_audio, self.prompt_text if self.mode == "zero_shot" else "")
            except P.ProtocolError as exc:
                raise RuntimeRequestError(INVALID, str(exc), "BAD_PROMPT") from None
        if self.mode in INSTRUCT_MODES:
            if not self.instruct.strip():
                raise RuntimeRequestError(INVALID, f"{self.mode} needs instruct_text", "NO_INSTRUCT")
            if len(self.instruct) > MAX_INSTRUCT_CHARS:
                raise RuntimeRequestError(INVALID, f"instruct_text is {len(self.instruct)} characters; the limit "
                                                   f"is {MAX_INSTRUCT_CHARS}", "INSTRUCT_TOO_LONG")

    def job_spec(self, snap: StatusSnapshot, priority: str = P.INTERACTIVE, prefix: str = "rt") -> JobSpec:
        """The job for this request, given what the broker serves now; raises RuntimeRequestError. An unknown
        spk_id is left to the broker, whose UNKNOWN_VOICE lists the voices (NOT_FOUND), and so is a prompt with
        no cloning worker (CANNOT_CLONE: PRECONDITION)."""
        self.validate()
        voice = (self.spk_id.strip() or None) if self.mode in VOICE_MODES else None  # "": the default voice
        if self.mode in INSTRUCT_MODES:
            check_instruct(snap, voice, clone=self.mode == "instruct2")
        spec = JobSpec(text=self.text, voice=voice, priority=priority,
                       instruct=self.instruct if self.mode in INSTRUCT_MODES else "",
                       prompt_audio=self.prompt_audio if self.mode in PROMPT_MODES else b"",
                       prompt_text=self.prompt_text if self.mode == "zero_shot" else "")
        spec.job = f"{prefix}-{spec.job}"
        return spec


def check_instruct(snap: StatusSnapshot, voice: str | None, clone: bool) -> None:
    """Some worker that would take the job has an instruct mode; else PRECONDITION (or NOT_FOUND for a voice no
    worker serves). With no workers at all the job stream answers UNAVAILABLE."""
    if not snap.workers:
        return
    if clone:
        takers = [w for w in snap.workers if w.get("clone")]
        if not takers:
            return  # the broker's CANNOT_CLONE says it better
    elif voice is None:  # each worker's own default voice
        takers = snap.workers
    else:
        takers = [w for w in snap.workers if voice in w.get("voices", [])]
        if not takers:
            raise RuntimeRequestError(NOT_FOUND, f"unknown voice {voice!r}; available: {', '.join(snap.voices)}",
                                      P.UNKNOWN_VOICE, snap.voices)
    if not any(w.get("instruct") for w in takers):
        engines = sorted({str(w.get("engine")) for w in takers})
        able = sorted({str(w.get("engine")) for w in snap.workers if w.get("instruct")}) or list(KNOWN_INSTRUCT_ENGINES)
        what = f"voice {voice!r}" if voice else "the default voice"
        raise RuntimeRequestError(PRECONDITION, f"{what} is served by {', '.join(engines)}, which has no instruct "
                                                f"mode (engines that have one: {', '.join(able)})",
                                  "NO_INSTRUCT_MODE")


def bearer_ok(authorization: str, key: str | None) -> bool:
    """Whether an ``Authorization: Bearer KEY`` header (or gRPC metadata) carries the key; always, with no key."""
    if not key:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
