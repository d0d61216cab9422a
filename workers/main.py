"""`cosy worker`: load the engine, warm it up, serve until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from cosy import logs
from cosy.endpoints import Endpoints

log = logging.getLogger("cosy.worker")


def run_worker(engine_name: str, endpoints: Endpoints, options: dict[str, str], name: str | None,
               heartbeat_s: float, log_level: str, device: str | None = None, stall_s: float | None = None) -> int:
    logs.setup(log_level)
    from cosy.workers.engines import EngineError, load_engine
    from cosy.workers.worker import EXIT_STALLED, STALL_S, Worker

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        engine = load_engine(engine_name, **options)
    except (EngineError, ValueError, TypeError) as exc:
        print(f"cosy worker: cannot start the {engine_name} engine: {exc}", file=sys.stderr)
        return 2
    worker = Worker(engine, endpoints, name=name, heartbeat_s=heartbeat_s,
                    stall_s=STALL_S if stall_s is None else stall_s)
    worker.warm_up()
    try:
        worker.run(stop)
    finally:
        if not worker.stalled:
            engine.close()
    if worker.stalled:
        # The stuck thread would keep the interpreter from exiting (and engine.close() may wait on it too).
        log.error("a synthesis thread is stuck: exiting with %d so the worker is started afresh", EXIT_STALLED)
        logging.shutdown()
        os._exit(EXIT_STALLED)
    return 0
