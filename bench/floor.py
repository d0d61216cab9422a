"""Bare pyzmq processes: the floors the suites compare cosy against, in the same run.

    python -m cosy.bench.floor direct  DIR CHUNKS BYTES   DEALER -> ROUTER -> PUB(XPUB) -> SUB: the issue's floor
    python -m cosy.bench.floor relay   DIR                the broker's four sockets, bare (no protocol, no scheduler)
    python -m cosy.bench.floor rworker DIR CHUNKS BYTES   a bare worker for `relay`: DEALER in, XPUB out
    python -m cosy.bench.floor proxy   DIR                zmq.proxy(XSUB, XPUB): the audio forwarder floor
    python -m cosy.bench.floor source  DIR MODE SECONDS BYTES STREAMS   publishes chunks as fast as it can,
                                                          MODE bare (to `proxy`) or cosy (registers with a broker)

Every floor publishes the same frames as cosy ([topic, msgpack header, PCM]) and, like the broker, holds a
job until the client's subscription to its topic has arrived (XPUB_VERBOSE), so no chunk is lost to a slow join.
Endpoints are ipc sockets named as cosy's inside DIR. Each process runs until SIGTERM (source: SECONDS).
"""

from __future__ import annotations

import signal
import sys
import time
from collections import deque
from pathlib import Path

import msgpack
import zmq

from cosy import protocol as P

RATE = 22050


def _ep(d: str, name: str) -> str:
    return f"ipc://{Path(d).absolute()}/{name}.sock"


def _sock(ctx: zmq.Context, kind: int, ep: str, bind: bool, verbose: bool = False) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if kind in (zmq.XPUB, zmq.PUB):
        s.setsockopt(zmq.SNDHWM, 100_000)
    if kind in (zmq.SUB, zmq.XSUB):
        s.setsockopt(zmq.RCVHWM, 100_000)
    if verbose:
        s.setsockopt(zmq.XPUB_VERBOSE, 1)
    (s.bind if bind else s.connect)(ep)
    return s


def header(job: str, seq: int, final: bool = False, total: int = 0, samples: int = 0) -> bytes:
    """The same header bytes cosy sends (a ChunkHeader map), built with plain msgpack."""
    return msgpack.packb({"job": job, "run": "0123456789abcdef", "attempt": 1, "seq": seq, "sample_rate": RATE,
                          "format": "s16le", "channels": 1, "final": final, "total_chunks": total,
                          "total_samples": samples})


def publish_job(xpub: zmq.Socket, job: bytes, chunks: int, pcm: bytes) -> None:
    name = job.decode()
    topic = job + b"\0"
    for seq in range(chunks):
        xpub.send_multipart([topic, header(name, seq), pcm])
    xpub.send_multipart([topic, header(name, chunks, True, chunks + 1, chunks * len(pcm) // 2), b""])


def _subs(xpub: zmq.Socket, subscribed: set[bytes]) -> None:
    while True:
        try:
            msg = xpub.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        if msg[:1] == b"\x01":
            subscribed.add(msg[1:])
        elif msg[:1] == b"\x00":
            subscribed.discard(msg[1:])


def _take_jobs(front: zmq.Socket, pending: deque[tuple[bytes, bytes]]) -> None:
    """Queue every (client, job) waiting on the front ROUTER."""
    while True:
        try:
            cid, job = front.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        pending.append((cid, job))


def _subscribed_jobs(pending: deque[tuple[bytes, bytes]], subscribed: set[bytes]) -> list[tuple[bytes, bytes]]:
    """Take the pending jobs whose client has subscribed to their topic; the others keep waiting, in order."""
    ready = []
    for _ in range(len(pending)):
        cid, job = pending.popleft()
        if job + b"\0" in subscribed:
            ready.append((cid, job))
        else:
            pending.append((cid, job))
    return ready


def direct(d: str, chunks: int, nbytes: int, stop: list[bool]) -> None:
    ctx = zmq.Context.instance()
    front = _sock(ctx, zmq.ROUTER, _ep(d, "front"), True)
    audio = _sock(ctx, zmq.XPUB, _ep(d, "audio"), True, verbose=True)
    pcm = bytes(nbytes)
    subscribed: set[bytes] = set()
    pending: deque[tuple[bytes, bytes]] = deque()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(audio, zmq.POLLIN)
    while not stop[0]:
        events = dict(poller.poll(100))
        if audio in events:
            _subs(audio, subscribed)
        if front in events:
            _take_jobs(front, pending)
        for cid, job in _subscribed_jobs(pending, subscribed):
            publish_job(audio, job, chunks, pcm)
            front.send_multipart([cid, job, b"D"])


def relay(d: str, stop: list[bool]) -> None:
    """The broker's shape with nothing else: front ROUTER, back ROUTER, XSUB -> XPUB forwarding by hand."""
    ctx = zmq.Context.instance()
    front = _sock(ctx, zmq.ROUTER, _ep(d, "front"), True)
    back = _sock(ctx, zmq.ROUTER, _ep(d, "back"), True)
    audio_in = _sock(ctx, zmq.XSUB, _ep(d, "audio-in"), True)
    audio_in.send(b"\x01")
    audio = _sock(ctx, zmq.XPUB, _ep(d, "audio"), True, verbose=True)
    workers: deque[bytes] = deque()
    subscribed: set[bytes] = set()
    pending: deque[tuple[bytes, bytes]] = deque()
    poller = zmq.Poller()
    for s in (front, back, audio_in, audio):
        poller.register(s, zmq.POLLIN)
    while not stop[0]:
        events = dict(poller.poll(100))
        if audio_in in events:
            for _ in range(1000):
                try:
                    frames = audio_in.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                audio.send_multipart(frames, copy=False)
        if audio in events:
            _subs(audio, subscribed)
        if back in events:
            while True:
                try:
                    frames = back.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[1] == b"READY":
                    workers.append(frames[0])
                else:
                    front.send_multipart(frames[1:])
        if front in events:
            _take_jobs(front, pending)
        if workers:
            for cid, job in _subscribed_jobs(pending, subscribed):
                workers.rotate(1)
                back.send_multipart([workers[0], cid, job])


def rworker(d: str, chunks: int, nbytes: int, stop: list[bool]) -> None:
    ctx = zmq.Context.instance()
    xpub = _sock(ctx, zmq.XPUB, _ep(d, "audio-in"), False)
    while not xpub.poll(100):  # the relay's subscribe-all: from now on nothing is lost to a slow join
        if stop[0]:
            return
    xpub.recv()
    dealer = _sock(ctx, zmq.DEALER, _ep(d, "back"), False)
    dealer.send(b"READY")
    pcm = bytes(nbytes)
    while not stop[0]:
        if not dealer.poll(100):
            continue
        while True:
            try:
                cid, job = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            publish_job(xpub, job, chunks, pcm)
            dealer.send_multipart([cid, job, b"D"])


def proxy(d: str) -> None:
    ctx = zmq.Context.instance()
    xsub = _sock(ctx, zmq.XSUB, _ep(d, "audio-in"), True)
    xpub = _sock(ctx, zmq.XPUB, _ep(d, "audio"), True)
    try:
        zmq.proxy(xsub, xpub)
    except zmq.ContextTerminated:
        pass


def source(d: str, mode: str, seconds: float, nbytes: int, streams: int) -> None:
    """Publish as fast as possible to `streams` topics for `seconds`; write how many were sent to DIR/sent."""
    ctx = zmq.Context.instance()
    xpub = _sock(ctx, zmq.XPUB, _ep(d, "audio-in"), False)
    dealer = None
    jobs: list[tuple[str, str, int]] = []  # job, run, attempt
    deadline = time.monotonic() + 20
    if mode == "bare":
        seen: set[bytes] = set()
        want = {f"t{i}".encode() + b"\0" for i in range(streams)}
        while not want <= seen and time.monotonic() < deadline:
            if xpub.poll(100):
                _subs(xpub, seen)
        jobs = [(f"t{i}", "0123456789abcdef", 1) for i in range(streams)]
    else:
        while not xpub.poll(100):
            if time.monotonic() > deadline:
                raise SystemExit("no subscription from the broker")
        xpub.recv()
        dealer = _sock(ctx, zmq.DEALER, _ep(d, "back"), False)
        dealer.send_multipart(P.Ready("bench-source", "bench", "bench", ["bench"], "bench", RATE, "cpu", 256,
                                      0).to_frames())
        while len(jobs) < streams and time.monotonic() < deadline:
            if dealer.poll(100):
                msg = P.decode(dealer.recv_multipart(), P.BROKER_TO_WORKER)
                if isinstance(msg, P.Job):
                    jobs.append((msg.job, msg.run, msg.attempt))
    pcm = bytes(nbytes)
    topics = [P.topic(j) for j, _, _ in jobs]
    sent = 0
    t_end = time.monotonic() + seconds
    next_hb = 0.0
    seq = 0
    while True:
        now = time.monotonic()
        if now > t_end:
            break
        if dealer is not None and now > next_hb:
            dealer.send_multipart(P.Heartbeat(runs=[r for _, r, _ in jobs]).to_frames())
            next_hb = now + 0.3
            while dealer.poll(0):
                dealer.recv_multipart()
        for i, (job, run, attempt) in enumerate(jobs):  # one chunk for every stream, round robin
            h = P.ChunkHeader(job, run, attempt, seq, RATE, "s16le", 1).pack()
            xpub.send_multipart([topics[i], h, pcm])
        sent += len(jobs)
        seq += 1
    if dealer is not None:
        for job, run, attempt in jobs:
            done = P.JobDone(job, run, attempt, seq + 1, seq * nbytes // 2, RATE, 0.0, 0.0, "bench-source")
            xpub.send_multipart([P.topic(job), P.ChunkHeader(job, run, attempt, seq, RATE, "s16le", 1, True,
                                                             seq + 1, seq * nbytes // 2).pack(), b""])
            dealer.send_multipart(done.to_frames())
        dealer.send_multipart(P.Disconnect().to_frames())
        time.sleep(0.1)
    (Path(d) / "sent").write_text(str(sent))


def main(argv: list[str]) -> None:
    stop = [False]

    def on_term(*_: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    mode, d, *rest = argv
    if mode == "direct":
        direct(d, int(rest[0]), int(rest[1]), stop)
    elif mode == "relay":
        relay(d, stop)
    elif mode == "rworker":
        rworker(d, int(rest[0]), int(rest[1]), stop)
    elif mode == "proxy":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        proxy(d)
    elif mode == "source":
        source(d, rest[0], float(rest[1]), int(rest[2]), int(rest[3]))
    else:
        raise SystemExit(f"unknown floor {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
