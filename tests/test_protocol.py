"""The wire protocol against its written form (PROTOCOL.md) and against malformed input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import msgpack
import pytest

from cosy import protocol as P

ROOT = Path(__file__).resolve().parents[1]


def test_every_message_type_is_documented_in_protocol_md() -> None:
    doc = (ROOT / "PROTOCOL.md").read_text()
    documented = set(re.findall(r"^#### `([A-Z_]+)`", doc, flags=re.M))
    in_code = {t.decode() for table in (P.CLIENT_MESSAGES, P.BROKER_TO_CLIENT, P.WORKER_MESSAGES,
                                        P.BROKER_TO_WORKER) for t in table} | {P.ReplayChunk.TYPE.decode()}
    assert in_code == documented
    assert P.PROTO.decode() in doc


def test_documented_fields_match_the_dataclasses() -> None:
    doc = (ROOT / "PROTOCOL.md").read_text()
    for cls in (P.Submit, P.Cancel, P.Replay, P.Accepted, P.Rejected, P.Started, P.JobDone, P.JobFailed,
                P.Ready, P.Heartbeat, P.Job, P.CancelRun, P.Ping, P.Pong):
        # A type name can head two sections (CANCEL and DONE exist on both sockets).
        parts = doc.split(f"#### `{cls.TYPE.decode()}`")[1:]
        section = "".join(p.split("####", 1)[0] for p in parts)
        for name in (f.name for f in dataclasses.fields(cls)):
            assert f"`{name}`" in section, f"{cls.__name__}.{name} not documented"


def test_documented_error_codes_exist() -> None:
    doc = (ROOT / "PROTOCOL.md").read_text()
    for code in (P.BAD_REQUEST, P.BUSY, P.TEXT_TOO_LONG, P.UNKNOWN_VOICE, P.DUPLICATE_JOB, P.UNKNOWN_JOB,
                 P.ENGINE_ERROR, P.ENGINE_STALLED, P.WORKER_LOST, P.CANCELLED, P.REPLAY_GONE, P.CLIENT_GONE,
                 P.CANNOT_CLONE):
        assert f"`{code}`" in doc


def test_round_trip_of_every_message() -> None:
    samples = [
        P.Submit("job-1", "hello", "client-1", "joe", 1.25, P.BULK),
        P.Submit("job-2", "hello", "client-1", None, 1.0, P.INTERACTIVE, "", b"\x01\x00" * 8000, "its words"),
        P.Cancel("job-1", "client-1"), P.StatusRequest(), P.Ping("c"), P.Replay("job-1", "r1", [0, 3]),
        P.Accepted("job-1", "e1", 3), P.Rejected("job-1", P.UNKNOWN_VOICE, "no", ["joe"]),
        P.Started("job-1", "r1", 2, "w"), P.JobDone("job-1", "r1", 1, 3, 100, 22050, 1.5, 0.1, "w"),
        P.JobFailed("job-1", P.ENGINE_ERROR, "boom", "r1", 1, True), P.StatusReply({"a": 1}), P.Pong("e"),
        P.Ready("w", "piper", "m", ["joe"], "joe", 22050, "cpu", 2, 123, "h"),
        P.Heartbeat("e", ["r1"], {"x": 1.0}), P.Job("job-1", "r1", 1, "t", None, 1.0), P.CancelRun("job-1", "r1"),
        P.Job("job-2", "r2", 1, "t", None, 1.0, "", b"\x00\x00" * 8000, ""),
        P.Ready("w", "cosyvoice", "m", ["joe"], "joe", 24000, "cuda:0", 4, 1, "h", clone=True),
        P.Reconnect(), P.Disconnect(),
    ]
    tables = [P.CLIENT_MESSAGES, P.BROKER_TO_CLIENT, P.WORKER_MESSAGES, P.BROKER_TO_WORKER]
    for msg in samples:
        table = next(t for t in tables if t.get(msg.TYPE) is type(msg))
        assert P.decode(msg.to_frames(), table) == msg


def test_chunk_header_round_trip_and_ranges() -> None:
    h = P.ChunkHeader("j", "r", 1, 7, 22050, "s16le", 1, True, 8, 1000)
    assert P.ChunkHeader.unpack(h.pack()) == h
    for bad in (dict(seq=-1), dict(format="mp3"), dict(channels=0), dict(sample_rate=10), dict(attempt=0)):
        fields = {**h.__dict__, **bad}
        with pytest.raises(P.ProtocolError):
            P.ChunkHeader.unpack(msgpack.packb(fields))


@pytest.mark.parametrize("frames", [
    [],
    [b"COSY1"],
    [b"NOPE", b"SUBMIT", msgpack.packb({})],
    [P.PROTO, b"WHAT", msgpack.packb({})],
    [P.PROTO, b"SUBMIT", b"\xc1\xc1\xc1"],
    [P.PROTO, b"SUBMIT", msgpack.packb([1, 2, 3])],
    [P.PROTO, b"SUBMIT", msgpack.packb({"job": "a", "text": 5, "client": "c"})],
    [P.PROTO, b"SUBMIT", msgpack.packb({"job": "../etc", "text": "x", "client": "c"})],
    [P.PROTO, b"SUBMIT", msgpack.packb({"job": "a", "text": "x", "client": "c", "priority": "urgent"})],
    [P.PROTO, b"SUBMIT", msgpack.packb({"job": "a", "text": "x", "client": "c", "speed": True})],
    [P.PROTO, b"SUBMIT", msgpack.packb({"job": "a", "text": "x", "client": "c", "extra": 1}), b"4th"],
    [P.PROTO, b"REPLAY", msgpack.packb({"job": "a", "run": "r", "seqs": [-1]})],
    [P.PROTO, b"SUBMIT", msgpack.packb({1: 2})],
    [P.PROTO, b"SUBMIT", b"\xdf\xff\xff\xff\xff"],  # map32 claiming 4 billion entries
])
def test_malformed_messages_raise_protocol_error(frames: list[bytes]) -> None:
    with pytest.raises(P.ProtocolError):
        P.decode(frames, P.CLIENT_MESSAGES)


def test_topic_cannot_prefix_match_another_job() -> None:
    assert not P.topic("job10").startswith(P.topic("job1"))


def test_a_job_prompt_is_bounded_and_checked() -> None:
    ok = P.Submit("j", "hi", "c", prompt_audio=b"\x00\x00" * 16000, prompt_text="words")
    assert P.decode(ok.to_frames(), P.CLIENT_MESSAGES) == ok
    too_long = P.Submit("j", "hi", "c", prompt_audio=b"\x00" * (P.MAX_PROMPT_BYTES + 2))
    odd = P.Submit("j", "hi", "c", prompt_audio=b"\x00" * 16001)
    short = P.Submit("j", "hi", "c", prompt_audio=b"\x00\x00" * 100)
    text_only = P.Submit("j", "hi", "c", prompt_text="words without audio")
    for bad, why in ((too_long, "0.5-30 s"), (odd, "even"), (short, "0.5-30 s"), (text_only, "without")):
        with pytest.raises(P.ProtocolError, match=why):
            P.decode(bad.to_frames(), P.CLIENT_MESSAGES)
    old_peer = {k: v for k, v in dataclasses.asdict(ok).items() if not k.startswith("prompt")}
    assert P.Submit.from_body(old_peer).prompt_audio == b""  # a SUBMIT from an older client
