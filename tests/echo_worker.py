"""A real cosy worker (workers/worker.py) whose engine is the tone engine plus two things the gateway tests need.

- It clones (``clone = True`` in its READY), as CosyVoice does, so the broker routes jobs with their own prompt
  to it: the gateway's per-request prompts can be tested without torch.
- It says it follows instructions (``instruct = True``), as CosyVoice does, so the runtime routes' instruct
  modes take its voice (it records the instruct; its tone does not change).
- It writes what each job asked for (text, voice, instruct, prompt_audio's length and its first bytes' hash,
  prompt_text) as a JSON line to ``--record``, so a test can see what reached the engine.

    python tests/echo_worker.py --runtime-dir DIR --name NAME --record FILE [--voices parrot]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cosy.endpoints import ipc_endpoints
from cosy.workers.engines.base import SynthesisRequest
from cosy.workers.engines.tone import ToneEngine
from cosy.workers.worker import Worker


class EchoEngine(ToneEngine):
    name = "echo"
    clone = True
    instruct = True

    def __init__(self, record: Path, **options: str) -> None:
        super().__init__(**options)
        self._record = record
        self._lock = threading.Lock()

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        entry = {"job": request.job, "text": request.text, "voice": request.voice, "instruct": request.instruct,
                 "prompt_bytes": len(request.prompt_audio), "prompt_text": request.prompt_text,
                 "prompt_sha1": hashlib.sha1(request.prompt_audio).hexdigest() if request.prompt_audio else ""}
        with self._lock, self._record.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        yield from super().synthesize(request)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime-dir", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--record", type=Path, required=True)
    ap.add_argument("--voices", default="parrot")
    ap.add_argument("--heartbeat-ms", type=int, default=200)
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    engine = EchoEngine(args.record, voices=args.voices, capacity="4")
    worker = Worker(engine, ipc_endpoints(args.runtime_dir), name=args.name, heartbeat_s=args.heartbeat_ms / 1000)
    worker.warm_up()
    worker.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
