"""`cosy worker`: load the engine, warm it up, serve until SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

from cosy import logs
from cosy.endpoints import Endpoints

log = logging.getLogger("cosy.worker")


def run_worker(engine_name: str, endpoints: Endpoints, options: dict[str, str], name: str | None,
               heartbeat_s: float, log_level: str, device: str | None = None) -> int:
    logs.setup(log_level)
    from cosy.workers.engines import EngineError, load_engine
    from cosy.workers.worker import Worker

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
    worker = Worker(engine, endpoints, name=name, heartbeat_s=heartbeat_s)
    worker.warm_up()
    try:
        worker.run(stop)
    finally:
        engine.close()
    return 0
