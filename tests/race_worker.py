"""A real cosy worker (workers/worker.py, the tone engine's audio) that can be told to put its messages in the order
a race needs, so that tests/test_races.py can make a race happen every time instead of now and then.

- ``--late N``: each run's last N chunks (the final, empty one included) leave only after the broker has counted the
  run's DONE, as they do when the DONE overtakes them (the DONE goes on the back socket, the chunks on audio-in).
- ``--gate FILE``: a job whose id starts with ``gated`` stops before its chunk 3 until FILE exists.
- ``--slow-cancel S``: the engine runs its jobs on threads of its own (as CosyVoice's pipeline does) and, told to
  cancel a run, finishes its step for S seconds and then reports the run done, as the Sink protocol allows.

    python tests/race_worker.py --runtime-dir DIR --name NAME [--late 2] [--gate FILE] [--slow-cancel 1.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq

from cosy import logs
from cosy import protocol as P
from cosy.endpoints import Endpoints, ipc_endpoints
from cosy.workers.engines.base import Sink, SynthesisRequest
from cosy.workers.engines.tone import ToneEngine
from cosy.workers.worker import Worker

log = logging.getLogger("cosy.race_worker")
GATED_SEQ = 3
DEADLINE_S = 60.0


class SlowCancelEngine:
    """The tone engine's audio, from a pool of threads of its own; a cancelled run is reported done ``cancel_s``
    later (an engine finishing the step it is in)."""

    def __init__(self, tone: ToneEngine, cancel_s: float) -> None:
        self.tone = tone
        self.cancel_s = cancel_s
        self._pool = ThreadPoolExecutor(max_workers=tone.capacity, thread_name_prefix="slow-cancel")

    def __getattr__(self, name: str) -> Any:  # name, model, sample_rate, capacity, voices(), metrics()...
        return getattr(self.tone, name)

    @property
    def default_voice(self) -> str:
        return self.tone.default_voice

    def start(self, request: SynthesisRequest, sink: Sink) -> None:
        self._pool.submit(self._run, request, sink)

    def cancel(self, run: str) -> None:
        pass  # the worker set the request's `cancelled`; _run sees it between two chunks

    def _run(self, request: SynthesisRequest, sink: Sink) -> None:
        try:
            for pcm in self.tone.synthesize(dataclasses.replace(request, cancelled=threading.Event())):
                if request.cancelled.is_set():
                    time.sleep(self.cancel_s)  # the step in progress
                    break
                sink.audio(pcm)
            sink.done()
        except BaseException:  # what the sink raises is the worker's bug: make it visible in the log
            log.exception("run %s: the sink raised", request.run)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class RaceWorker(Worker):
    def __init__(self, engine: Any, endpoints: Endpoints, late: int, gate: Path | None, **kwargs: Any) -> None:
        super().__init__(engine, endpoints, **kwargs)
        self.late = late
        self.gate = gate
        self._held: dict[str, list[list[Any]]] = {}  # run -> its chunks held back (--late)
        self._held_lock = threading.Lock()

    def _publish(self, parts: list[Any]) -> None:
        header = P.ChunkHeader.unpack(bytes(parts[1]))
        if self.gate is not None and header.job.startswith("gated") and header.seq == GATED_SEQ:
            deadline = time.monotonic() + DEADLINE_S
            while not self.gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        if not self.late:
            super()._publish(parts)
            return
        with self._held_lock:
            held = self._held.setdefault(header.run, [])
            held.append(parts)
            out = [] if header.final else held[:len(held) - (self.late - 1)]  # the final one makes N
            del held[:len(out)]
        for chunk in out:
            super()._publish(chunk)
        if header.final:
            done_before = self.stats.done
            threading.Thread(target=self._release, args=(header.run, done_before), daemon=True).start()

    def _release(self, run: str, done_before: int) -> None:
        """Publish the run's held chunks once the broker has counted its DONE (more DONEs than before)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoints.front)
        try:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline:
                sock.send_multipart(P.StatusRequest().to_frames())
                if sock.poll(1000):
                    reply = P.decode(sock.recv_multipart(), P.BROKER_TO_CLIENT)
                    if isinstance(reply, P.StatusReply) and reply.status["counters"]["done"] > done_before:
                        break
                time.sleep(0.02)
        finally:
            sock.close(linger=0)
        with self._held_lock:
            held = self._held.pop(run, [])
        log.info("run %s: %d chunks sent after the broker counted its DONE", run, len(held))
        for chunk in held:
            Worker._publish(self, chunk)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime-dir", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--late", type=int, default=0)
    ap.add_argument("--gate", type=Path)
    ap.add_argument("--slow-cancel", type=float)
    ap.add_argument("--capacity", default="4")
    ap.add_argument("--delay-ms", default="0")
    ap.add_argument("--heartbeat-ms", type=int, default=200)
    args = ap.parse_args()
    logs.setup("INFO")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    engine: Any = ToneEngine(capacity=args.capacity, delay_ms=args.delay_ms)
    if args.slow_cancel is not None:
        engine = SlowCancelEngine(engine, args.slow_cancel)
    worker = RaceWorker(engine, ipc_endpoints(args.runtime_dir), args.late, args.gate, name=args.name,
                        heartbeat_s=args.heartbeat_ms / 1000)
    worker.warm_up()
    try:
        worker.run(stop)
    finally:
        engine.close()
    log.info("worker %s stopped", args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
