"""The cosy wire protocol, version 1 (see PROTOCOL.md).

Control messages on the front (client <-> broker) and back (worker <-> broker)
sockets are three frames after any ROUTER identity:

    [PROTO, TYPE, BODY]

PROTO is ``b"COSY1"``, TYPE one of the ASCII names below and BODY a msgpack map.
Audio chunks on the PUB/XSUB/XPUB path are three frames:

    [TOPIC, HEADER, PCM]

TOPIC is ``job_id + b"\\0"`` (the NUL keeps ``job1`` from prefix-matching ``job10``),
HEADER a msgpack map (:class:`ChunkHeader`) and PCM the raw little-endian samples.

Every decoder here validates what a peer sent and raises :class:`ProtocolError`
on anything malformed; loops catch it, log it and drop the message.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

PROTO = b"COSY1"
VERSION = 1

# Sizes. MAX_*_MSG become ZMQ_MAXMSGSIZE on the bound sockets: a peer that sends
# more is disconnected by libzmq before the bytes reach Python.
MAX_FRONT_MSG = 2 << 20  # 2 MiB: a job with its own prompt audio, and room for a rejected over-long text
MAX_BACK_MSG = 2 << 20
MAX_AUDIO_MSG = 8 << 20
MAX_SUB_MSG = 1024  # subscriptions arriving on the broker's XPUB
MAX_TEXT_CHARS = 20_000
# A job's own reference voice (zero-shot / cross-lingual cloning): 16 kHz mono s16le, 1-30 s.
PROMPT_RATE = 16_000
MAX_PROMPT_BYTES = 30 * PROMPT_RATE * 2
MIN_PROMPT_BYTES = PROMPT_RATE * 2 // 2  # half a second
MAX_PROMPT_TEXT = 2000
MAX_JOB_ID = 64
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")

INTERACTIVE = "interactive"
BULK = "bulk"
PRIORITIES = (INTERACTIVE, BULK)

SAMPLE_FORMATS = {"s16le": 2, "f32le": 4}

# Rejection / failure codes (PROTOCOL.md "Errors").
BAD_REQUEST = "BAD_REQUEST"
BUSY = "BUSY"
TEXT_TOO_LONG = "TEXT_TOO_LONG"
UNKNOWN_VOICE = "UNKNOWN_VOICE"
DUPLICATE_JOB = "DUPLICATE_JOB"
UNKNOWN_JOB = "UNKNOWN_JOB"
SHUTTING_DOWN = "SHUTTING_DOWN"
ENGINE_ERROR = "ENGINE_ERROR"
ENGINE_STALLED = "ENGINE_STALLED"
WORKER_LOST = "WORKER_LOST"
CANCELLED = "CANCELLED"
NO_SUBSCRIBER = "NO_SUBSCRIBER"
REPLAY_GONE = "REPLAY_GONE"
CLIENT_GONE = "CLIENT_GONE"
CANNOT_CLONE = "CANNOT_CLONE"


class ProtocolError(ValueError):
    """A message that does not follow the protocol."""


_unpack_limits = dict(
    raw=False,
    strict_map_key=True,
    max_str_len=MAX_FRONT_MSG,
    max_bin_len=MAX_AUDIO_MSG,
    max_array_len=4096,
    max_map_len=256,
    max_ext_len=0,
)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_map(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, **_unpack_limits)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable msgpack body: {exc.__class__.__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("body is not a msgpack map")
    return obj


# --- field checking -----------------------------------------------------------------

_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
    bytes: (bytes,),
    list: (list,),
    dict: (dict,),
}


@functools.cache
def _schema(cls: type) -> tuple[tuple[str, bool, bool, tuple[type, ...] | None, bool, bool], ...]:
    """Per message class, once: (name, required, optional, accepted types, numeric, is_float) per field."""
    hints = cls.__annotations__
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ("TYPE",):
            continue
        hint = hints[f.name]
        optional = isinstance(hint, str) and hint.endswith("| None")
        base = hint.split("|")[0].strip() if isinstance(hint, str) else hint
        base = base.split("[")[0] if isinstance(base, str) else base
        expected = {"str": str, "int": int, "float": float, "bool": bool, "bytes": bytes,
                    "list": list, "dict": dict}.get(base, None) if isinstance(base, str) else base
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, required, optional, _TYPES[expected] if expected is not None else None,
                    expected in (int, float), expected is float))
    return tuple(out)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "TYPE")


def _as_map(obj: Any) -> dict[str, Any]:
    """dataclasses.asdict without its recursive deep copy (our fields are plain values): 6x faster."""
    return {name: getattr(obj, name) for name in _field_names(type(obj))}


def _check(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, required, optional, types, numeric, is_float in _schema(cls):
        if name not in body:
            if required:
                raise ProtocolError(f"{cls.__name__}: missing field {name!r}")
            continue
        value = body[name]
        if value is None and optional:
            out[name] = None
            continue
        if types is not None:
            if not isinstance(value, types) or (numeric and isinstance(value, bool)):
                raise ProtocolError(f"{cls.__name__}: field {name!r} has type {type(value).__name__}")
            if is_float:
                value = float(value)
        out[name] = value
    return out


def check_prompt(audio: bytes, text: str) -> None:
    """A job's own prompt: whole 16-bit samples, 0.5-30 s at 16 kHz, a transcript only with audio."""
    if not audio:
        if text:
            raise ProtocolError("prompt_text without prompt_audio")
        return
    if len(audio) % 2:
        raise ProtocolError("prompt_audio must be 16-bit samples (an even number of bytes)")
    if not MIN_PROMPT_BYTES <= len(audio) <= MAX_PROMPT_BYTES:
        raise ProtocolError(f"prompt_audio must be 0.5-30 s of 16 kHz mono 16-bit PCM "
                            f"({MIN_PROMPT_BYTES}-{MAX_PROMPT_BYTES} bytes), got {len(audio)}")
    if len(text) > MAX_PROMPT_TEXT:
        raise ProtocolError(f"prompt_text is limited to {MAX_PROMPT_TEXT} characters")


def check_job_id(job: str) -> str:
    if not JOB_ID_RE.match(job):
        raise ProtocolError("job id must be 1-64 characters of A-Z a-z 0-9 . _ : - (not starting with a symbol)")
    return job


M = TypeVar("M", bound="Message")


@dataclass(frozen=True)
class Message:
    """A control message: frames [PROTO, TYPE, msgpack map of the fields] (PROTOCOL.md)."""

    TYPE: ClassVar[bytes] = b""

    def to_frames(self) -> list[bytes]:
        return [PROTO, self.TYPE, packb(_as_map(self))]

    @classmethod
    def from_body(cls: type[M], body: dict[str, Any]) -> M:
        msg = cls(**_check(cls, body))
        msg.validate()
        return msg

    def validate(self) -> None:
        """Semantic checks beyond types; raise ProtocolError."""


# --- client -> broker ---------------------------------------------------------------


@dataclass(frozen=True)
class Submit(Message):
    """Client -> broker: synthesize `text`; the job id is the client's, resubmission is idempotent."""

    TYPE: ClassVar[bytes] = b"SUBMIT"
    job: str
    text: str
    client: str
    voice: str | None = None
    speed: float = 1.0
    priority: str = INTERACTIVE
    # Instruct-capable engines (CosyVoice2/3): how to speak, e.g. "slowly and warmly". Others ignore it.
    instruct: str = ""
    # The job's own reference voice, for engines that clone (READY.clone): 16 kHz mono s16le PCM and, for
    # zero-shot, its transcript (without one: cross-lingual, the prompt's voice without its words).
    prompt_audio: bytes = b""
    prompt_text: str = ""

    def validate(self) -> None:
        check_job_id(self.job)
        if len(self.instruct) > 1000:
            raise ProtocolError("instruct is limited to 1000 characters")
        check_prompt(self.prompt_audio, self.prompt_text)
        if not (1 <= len(self.client) <= 64):
            raise ProtocolError("client id must be 1-64 characters")
        if self.priority not in PRIORITIES:
            raise ProtocolError(f"priority must be one of {PRIORITIES}")
        if self.voice is not None and not (1 <= len(self.voice) <= 128):
            raise ProtocolError("voice name must be 1-128 characters")


@dataclass(frozen=True)
class Cancel(Message):
    """Client -> broker: drop a queued job or stop a running one."""

    TYPE: ClassVar[bytes] = b"CANCEL"
    job: str
    client: str

    def validate(self) -> None:
        check_job_id(self.job)


@dataclass(frozen=True)
class StatusRequest(Message):
    """Client -> broker: ask for the broker's status (answered with STATUS_REPLY)."""

    TYPE: ClassVar[bytes] = b"STATUS"


@dataclass(frozen=True)
class Ping(Message):
    """Client heartbeat: keeps the client's jobs alive and learns the broker epoch."""

    TYPE: ClassVar[bytes] = b"PING"
    client: str


@dataclass(frozen=True)
class Replay(Message):
    """Ask for chunks of a run again, from the broker's replay buffer."""

    TYPE: ClassVar[bytes] = b"REPLAY"
    job: str
    run: str
    seqs: list[int] = field(default_factory=list)

    def validate(self) -> None:
        check_job_id(self.job)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seqs):
            raise ProtocolError("seqs must be non-negative integers")


# --- broker -> client ---------------------------------------------------------------


@dataclass(frozen=True)
class Accepted(Message):
    """Broker -> client: the job is queued (`queued` jobs ahead of it); `epoch` names this broker run."""

    TYPE: ClassVar[bytes] = b"ACCEPTED"
    job: str
    epoch: str
    queued: int = 0


@dataclass(frozen=True)
class Rejected(Message):
    """Broker -> client: the job was refused (`code`); for UNKNOWN_VOICE, `voices` lists those served; for
    REPLAY_GONE, `run` names the run asked for."""

    TYPE: ClassVar[bytes] = b"REJECTED"
    job: str
    code: str
    message: str
    voices: list[str] = field(default_factory=list)
    run: str = ""


@dataclass(frozen=True)
class Started(Message):
    """Broker -> client: attempt `attempt` of the job runs as `run` on `worker`."""

    TYPE: ClassVar[bytes] = b"STARTED"
    job: str
    run: str
    attempt: int
    worker: str


@dataclass(frozen=True)
class JobDone(Message):
    """Sent by the worker to the broker, and forwarded by the broker to the client."""

    TYPE: ClassVar[bytes] = b"DONE"
    job: str
    run: str
    attempt: int
    chunks: int
    samples: int
    sample_rate: int
    ttfc_ms: float = 0.0
    rtf: float = 0.0
    worker: str = ""


@dataclass(frozen=True)
class JobFailed(Message):
    """Sent by a worker (one attempt failed) and by the broker (the job failed for good)."""

    TYPE: ClassVar[bytes] = b"FAILED"
    job: str
    code: str
    message: str
    run: str = ""
    attempt: int = 0
    retryable: bool = False


@dataclass(frozen=True)
class StatusReply(Message):
    """Broker -> client: the status map (workers, queue, counters; see `cosy status --json`)."""

    TYPE: ClassVar[bytes] = b"STATUS_REPLY"
    status: dict


@dataclass(frozen=True)
class Pong(Message):
    """Broker -> client: the answer to PING, with the broker's epoch."""

    TYPE: ClassVar[bytes] = b"PONG"
    epoch: str


@dataclass(frozen=True)
class ReplayChunk(Message):
    """A replayed audio chunk sent over the (reliable) front socket: HEADER + PCM frames."""

    TYPE: ClassVar[bytes] = b"CHUNK"


# --- worker <-> broker --------------------------------------------------------------


@dataclass(frozen=True)
class Ready(Message):
    """Worker -> broker: registration (engine, voices, capacity...); `update` re-announces voices."""

    TYPE: ClassVar[bytes] = b"READY"
    worker: str
    engine: str
    model: str
    voices: list[str]
    default_voice: str
    sample_rate: int
    device: str
    capacity: int
    pid: int
    host: str = ""
    # True when a registered worker only announces new capabilities (e.g. its voices changed):
    # the broker updates them and keeps the worker's running jobs.
    update: bool = False
    # The engine clones a voice from a job's own prompt (SUBMIT.prompt_audio): only such workers get those jobs.
    clone: bool = False
    # The engine follows SUBMIT.instruct (others ignore it): what gateways check before an instruct request.
    instruct: bool = False

    def validate(self) -> None:
        if not (1 <= self.capacity <= 256):
            raise ProtocolError("capacity must be 1-256")
        if not all(isinstance(v, str) for v in self.voices):
            raise ProtocolError("voices must be strings")
        if not 1 <= len(self.worker) <= 128:
            raise ProtocolError("worker name must be 1-128 characters")


@dataclass(frozen=True)
class Heartbeat(Message):
    """Both ways on the back socket. From a worker it carries its running runs and metrics."""

    TYPE: ClassVar[bytes] = b"HEARTBEAT"
    epoch: str = ""
    runs: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job(Message):
    """Broker -> worker: run attempt `attempt` of a job as `run`."""

    TYPE: ClassVar[bytes] = b"JOB"
    job: str
    run: str
    attempt: int
    text: str
    voice: str | None = None
    speed: float = 1.0
    instruct: str = ""
    prompt_audio: bytes = b""
    prompt_text: str = ""

    @property
    def cloning(self) -> bool:
        return bool(self.prompt_audio)


@dataclass(frozen=True)
class CancelRun(Message):
    """Broker -> worker: stop the run (the client cancelled or went away)."""

    TYPE: ClassVar[bytes] = b"CANCEL"
    job: str
    run: str


@dataclass(frozen=True)
class Reconnect(Message):
    """Broker -> worker: I do not know you (e.g. after a broker restart); send READY again."""

    TYPE: ClassVar[bytes] = b"RECONNECT"


@dataclass(frozen=True)
class Disconnect(Message):
    """Worker -> broker: I am stopping; requeue whatever I still run."""

    TYPE: ClassVar[bytes] = b"DISCONNECT"


CLIENT_MESSAGES: dict[bytes, type[Message]] = {
    m.TYPE: m for m in (Submit, Cancel, StatusRequest, Ping, Replay)
}
BROKER_TO_CLIENT: dict[bytes, type[Message]] = {
    m.TYPE: m for m in (Accepted, Rejected, Started, JobDone, JobFailed, StatusReply, Pong)
}
WORKER_MESSAGES: dict[bytes, type[Message]] = {
    m.TYPE: m for m in (Ready, Heartbeat, JobDone, JobFailed, Disconnect)
}
BROKER_TO_WORKER: dict[bytes, type[Message]] = {
    m.TYPE: m for m in (Heartbeat, Job, CancelRun, Reconnect)
}


def decode(frames: list[bytes], table: dict[bytes, type[Message]]) -> Message:
    """Decode ``[PROTO, TYPE, BODY]`` against a table of allowed types."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    proto, mtype, body = frames
    if proto != PROTO:
        raise ProtocolError(f"unknown protocol tag {bytes(proto[:16])!r}")
    cls = table.get(bytes(mtype))
    if cls is None:
        raise ProtocolError(f"unexpected message type {bytes(mtype[:32])!r}")
    return cls.from_body(unpack_map(body))


# --- audio chunks -------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkHeader:
    """The header frame of an audio chunk: [topic, HEADER, PCM] on the audio sockets."""

    job: str
    run: str
    attempt: int
    seq: int
    sample_rate: int
    format: str
    channels: int
    final: bool = False
    # Totals, on the final chunk only: how many chunks and samples the run produced.
    total_chunks: int = 0
    total_samples: int = 0

    def pack(self) -> bytes:
        return packb(_as_map(self))

    @staticmethod
    def unpack(data: bytes) -> ChunkHeader:
        try:
            m = msgpack.unpackb(data, raw=False, strict_map_key=True, max_str_len=256, max_array_len=0,
                                max_map_len=16, max_bin_len=0, max_ext_len=0)
        except Exception as exc:
            raise ProtocolError(f"undecodable chunk header: {exc.__class__.__name__}") from None
        if type(m) is not dict:
            raise ProtocolError("chunk header must be a msgpack map")
        # The hot path (every chunk, in the broker and the client): check the common case inline, and let the
        # generic checker name the field only when something is wrong. Same rules either way.
        g = m.get
        job, run, fmt = g("job"), g("run"), g("format")
        attempt, seq, rate, channels = g("attempt"), g("seq"), g("sample_rate"), g("channels")
        final, total_chunks, total_samples = g("final", False), g("total_chunks", 0), g("total_samples", 0)
        if (type(job) is str and type(run) is str and type(fmt) is str and type(attempt) is int
                and type(seq) is int and type(rate) is int and type(channels) is int and type(final) is bool
                and type(total_chunks) is int and type(total_samples) is int):
            h = ChunkHeader(job, run, attempt, seq, rate, fmt, channels, final, total_chunks, total_samples)
        else:
            h = ChunkHeader(**_check(ChunkHeader, m))
        if (h.format not in SAMPLE_FORMATS or not (1 <= h.channels <= 8)
                or not (1000 <= h.sample_rate <= 384_000) or h.seq < 0 or h.attempt < 1):
            raise ProtocolError("chunk header out of range")
        return h

    @property
    def sample_width(self) -> int:
        return SAMPLE_FORMATS[self.format]


def topic(job: str) -> bytes:
    return job.encode() + b"\0"
