"""`cosy bench throughput`: chunks/s and MB/s through the broker's audio forwarder, many streams at once,
against a bare zmq.proxy(XSUB, XPUB) in the same run.

The same source process feeds both (`floor source`: it publishes pre-built 8820-byte chunks, 200 ms of
22050 Hz s16le, round robin over the streams, as fast as it can; for cosy it registers as a worker and
streams the jobs the broker gives it) and the same bare SUB counts what arrives; only the middle differs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import zmq

from cosy import protocol as P
from cosy.bench import common as C

CHUNK_BYTES = 8820
RATE = 22050
CHUNK_SWEEP_MS = (20, 100, 1000)  # 20 ms: a codec frame; 1 s: Piper's max_chunk_s and CosyVoice's first hop
SECONDS = 4.0
WINDOW = (0.8, 3.6)  # the part of the source's run that is counted (seconds after the first chunk)


def _count(sub: zmq.Socket, seconds: float) -> tuple[int, int]:
    """Chunks and bytes received in WINDOW after the first one."""
    n = nbytes = 0
    if not sub.poll(20_000):
        return 0, 0
    t_first = time.monotonic()
    start, end = t_first + WINDOW[0], t_first + min(WINDOW[1], seconds - 0.2)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if not sub.poll(100):
            continue
        while True:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if now >= start:
                n += 1
                nbytes += len(frames[2].buffer)
    return n, nbytes


def _measure(kind: str, streams: int, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    procs = C.Procs(f"cosy-bt{kind[0]}-")
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 100_000)
    dealer = None
    try:
        if kind == "floor":
            procs.spawn(["-m", "cosy.bench.floor", "proxy", str(procs.dir)], "proxy")
            C.wait_for(lambda: (procs.dir / "audio.sock").exists(), 10, "the proxy")
            sub.connect(f"ipc://{procs.dir}/audio.sock")
            for i in range(streams):
                sub.setsockopt(zmq.SUBSCRIBE, f"t{i}".encode() + b"\0")
            procs.spawn(["-m", "cosy.bench.floor", "source", str(procs.dir), "bare", str(SECONDS),
                         str(chunk_bytes), str(streams)], "source")
        else:
            procs.broker()
            sub.connect(f"ipc://{procs.dir}/audio.sock")
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"ipc://{procs.dir}/front.sock")
            for i in range(streams):
                job = f"s{i}"
                sub.setsockopt(zmq.SUBSCRIBE, P.topic(job))
                dealer.send_multipart(P.Submit(job, "bench", "bench-client").to_frames())
            procs.spawn(["-m", "cosy.bench.floor", "source", str(procs.dir), "cosy", str(SECONDS),
                         str(chunk_bytes), str(streams)], "source")
        n, nbytes = _count(sub, SECONDS)
        procs.procs[-1].wait(SECONDS + 30)
        sent_file = procs.dir / "sent"
        sent = int(sent_file.read_text()) if sent_file.exists() else 0
    finally:
        sub.close(linger=0)
        if dealer is not None:
            dealer.close(linger=0)
        procs.stop()
    secs = WINDOW[1] - WINDOW[0]
    return {"chunks_per_s": round(n / secs), "mb_per_s": round(nbytes / secs / 1e6, 1),
            "source_sent_per_s": round(sent / SECONDS)}


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    load_before = C.wait_low_load()
    rows = []
    for streams in (8, 64) if quick else (8, 64, 256):
        r: dict[str, Any] = {"streams": streams}
        for _rep in range(1 if quick else 2):  # alternate, so drift hits both alike; keep the best of each
            for kind in ("floor", "cosy"):
                m = _measure(kind, streams)
                best = r.get(kind)
                if best is None or m["chunks_per_s"] > best["chunks_per_s"]:
                    r[kind] = m
        r["ratio"] = C.ratio(r["cosy"]["chunks_per_s"], r["floor"]["chunks_per_s"])
        rows.append(r)
    # Chunk size: what a chunk costs against what a byte costs, at 64 streams. Audio seconds forwarded per
    # second of wall time is the number of real-time streams the forwarder could carry at that chunk size.
    sweep = []
    for chunk_ms in CHUNK_SWEEP_MS:
        nbytes = RATE * 2 * chunk_ms // 1000
        m = {kind: _measure(kind, 64, nbytes) for kind in ("floor", "cosy")}
        sweep.append({"chunk_ms": chunk_ms, "chunk_bytes": nbytes, "cosy_chunks_per_s": m["cosy"]["chunks_per_s"],
                      "floor_chunks_per_s": m["floor"]["chunks_per_s"], "cosy_mb_per_s": m["cosy"]["mb_per_s"],
                      "realtime_streams": round(m["cosy"]["chunks_per_s"] * chunk_ms / 1000),
                      "ratio": C.ratio(m["cosy"]["chunks_per_s"], m["floor"]["chunks_per_s"])})
    main = max(rows, key=lambda x: x["streams"])
    data = {
        "suite": "throughput", "chunk_bytes": CHUNK_BYTES, "endpoints": "ipc", "streams": rows,
        "chunks_per_s": main["cosy"]["chunks_per_s"], "mb_per_s": main["cosy"]["mb_per_s"],
        "floor_chunks_per_s": main["floor"]["chunks_per_s"], "floor_mb_per_s": main["floor"]["mb_per_s"],
        "ratio": main["ratio"], "chunk_sweep_64_streams": sweep,
        "targets": {"throughput >= 0.7x the bare proxy": main["ratio"] >= 0.7},
        "load_before": load_before, "load_after": os.getloadavg()[0], "machine": C.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    print(C.table(["streams", "cosy chunks/s", "MB/s", "proxy chunks/s", "MB/s", "ratio", "source sent/s"],
                  [[r["streams"], r["cosy"]["chunks_per_s"], r["cosy"]["mb_per_s"], r["floor"]["chunks_per_s"],
                    r["floor"]["mb_per_s"], r["ratio"], r["cosy"]["source_sent_per_s"]] for r in rows]))
    print(f"  ({CHUNK_BYTES}-byte chunks; floor: zmq.proxy(XSUB, XPUB), same source and sink)")
    print(C.table(["chunk ms", "bytes", "cosy chunks/s", "MB/s", "real-time streams", "ratio to proxy"],
                  [[r["chunk_ms"], r["chunk_bytes"], r["cosy_chunks_per_s"], r["cosy_mb_per_s"], r["realtime_streams"],
                    r["ratio"]] for r in sweep]))
    print("  (64 streams, 22050 Hz s16le; real-time streams = audio seconds forwarded per second)")
    C.bar_plot(out_dir, "throughput", "audio chunks forwarded per second (ipc)",
               [f"{r['streams']} streams" for r in rows],
               {"cosy broker": [r["cosy"]["chunks_per_s"] for r in rows],
                "bare XSUB/XPUB proxy": [r["floor"]["chunks_per_s"] for r in rows]}, "chunks/s")
    return data
