"""`cosy bench gpu`: the cosyvoice engine's two schedulers in the same run: cosy's pipeline against the library's
own per-request loop (the floor), first chunk and throughput at 1, 4 and 8 streams (16 on a GPU).

    cosy bench gpu --device cpu               # the generated tiny model (tests/tiny_cosyvoice.py), on the CPU
    cosy bench gpu --model-dir DIR            # a real or bench/full_cosyvoice.py model, on CUDA
    COSY_BENCH_GPU_STREAMS=1,4 COSY_BENCH_GPU_TEXT=... cosy bench gpu ...
    COSY_BENCH_GPU_SCHEDULERS=cosy,library cosy bench gpu ...   # the order (default library, then cosy)
    COSY_BENCH_GPU_VOICES=DIR cosy bench gpu ...                 # voice folders (default: the registry's, joe)

Each scheduler loads the model in a child process of its own (`python -m cosy.bench.gpu serve ...`), one after
the other, so the two never share the device while they are timed. In the child the engine is driven directly
(``engine.start(request, sink)``: the worker's own call, minus the sockets, which `cosy bench transport` measures
at under a millisecond), after the engine's warm-up. For each N it keeps N jobs in flight until ``jobs_per_stream
x N`` are done (a closed loop) and records each job's first chunk; ``audio_s_per_s`` is the loop's audio seconds
over its wall time, ``rtf`` the mean over jobs of job time over job audio.

With random weights the LLM never stops early: a text of n bytes is 20 n speech tokens, 0.8 n seconds of audio,
for either scheduler. With the cosy scheduler the run also stores the measured capacity (the most streams with a
mean RTF <= 0.5) in the engine's cache folder, where the next worker start reads it (`cosy status` says "bench").
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cosy.bench import common as C

TEXTS = {"cpu": "Hello there.", "cuda": "Streaming speech should start quickly, and keep flowing while it is made."}
STREAMS = {"cpu": (1, 4, 8), "cuda": (1, 4, 8, 16)}
JOBS_PER_STREAM = 2
SCHEDULERS = ("library", "cosy")
TARGETS = {
    "cpu": {"first chunk <= 0.5x the library's at 1 stream": ("ttfc_ratio", 1, 0.5, "<="),
            "throughput >= 2x the library's at 4 streams": ("throughput_ratio", 4, 2.0, ">=")},
    "cuda": {"first chunk <= 150 ms at 1 stream": ("first_chunk_p50_ms", 1, 150.0, "<="),
             "first chunk <= 400 ms at 4 streams": ("first_chunk_p50_ms", 4, 400.0, "<="),
             "RTF <= 0.1 at 1 stream": ("rtf", 1, 0.1, "<="),
             ">= 30 s of audio per second at 16 streams": ("audio_s_per_s", 16, 30.0, ">=")},
}


# --- the child: one engine, measured -----------------------------------------------------------------------


class _Job:
    def __init__(self, loop: _Loop) -> None:
        self.loop = loop
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.samples = 0

    def audio(self, pcm: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        self.samples += len(pcm)

    def done(self) -> None:
        self.loop.finish(self, None)

    def failed(self, error: BaseException) -> None:
        self.loop.finish(self, error)


class _Loop:
    """N jobs in flight until ``total`` are done."""

    def __init__(self, engine: Any, text: str, streams: int, total: int) -> None:
        self.engine, self.text, self.total = engine, text, total
        self.cond = threading.Condition()
        self.started = 0
        self.results: list[tuple[float, float, int]] = []  # first chunk s, job s, samples
        self.errors: list[str] = []
        self.t0 = time.perf_counter()
        for _ in range(min(streams, total)):
            self._start()

    def _start(self) -> None:
        from cosy.workers.engines.base import SynthesisRequest

        self.started += 1
        job = _Job(self)
        self.engine.start(SynthesisRequest(self.text, self.engine.default_voice, run=f"bench-{self.started}",
                                           job=f"bench-{self.started}"), job)

    def finish(self, job: _Job, error: BaseException | None) -> None:
        with self.cond:
            if error is not None:
                self.errors.append(f"{error.__class__.__name__}: {error}")
            else:
                self.results.append((job.first or float("nan"), time.perf_counter() - job.t0, job.samples))
            if self.started < self.total:
                self._start()
            self.cond.notify_all()

    def wait(self, timeout: float) -> float:
        with self.cond:
            self.cond.wait_for(lambda: len(self.results) + len(self.errors) >= self.total, timeout)
        return time.perf_counter() - self.t0


def measure(engine: Any, text: str, streams: int, jobs_per_stream: int, timeout: float = 1800) -> dict[str, Any]:
    loop = _Loop(engine, text, streams, streams * jobs_per_stream)
    wall = loop.wait(timeout)
    rate = engine.sample_rate
    audio_s = sum(r[2] for r in loop.results) / rate
    firsts = [r[0] for r in loop.results]
    k = C.ms_summary(firsts)
    rtfs = [r[1] / (r[2] / rate) for r in loop.results if r[2]]
    return {"streams": streams, "jobs": len(loop.results), "failed": len(loop.errors), "errors": loop.errors[:3],
            "first_chunk_p50_ms": round(k["p50"], 1), "first_chunk_p99_ms": round(k["p99"], 1),
            "audio_s_per_s": round(audio_s / wall, 3) if wall else None,
            "rtf": round(statistics.fmean(rtfs), 4) if rtfs else None, "wall_s": round(wall, 2),
            "audio_s_per_job": round(audio_s / len(loop.results), 3) if loop.results else None}


def serve(model_dir: str, scheduler: str, capacity: int) -> None:
    """The child: load, warm up, print an info line, then one result line per "N JOBS TEXT" line on stdin."""
    import torch

    from cosy.workers.engines import load_engine

    t0 = time.perf_counter()
    voices = {"voices_dir": os.environ["COSY_BENCH_GPU_VOICES"]} if os.environ.get("COSY_BENCH_GPU_VOICES") else {}
    engine = load_engine("cosyvoice", model_dir=model_dir, capacity=str(capacity), scheduler=scheduler, **voices,
                         max_batch=str(max(capacity, 1)), text_frontend="false")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    engine.warm_up()
    info = {"scheduler": scheduler, "load_s": round(load_s, 1), "warm_up_s": round(time.perf_counter() - t1, 1),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "engine_model": engine.model,
            "pipeline": {k: v for k, v in getattr(engine, "_pipeline_info", {}).items() if k != "schedule"}}
    print(json.dumps(info, default=str), flush=True)
    rows = []
    for line in sys.stdin:
        if not line.strip():
            continue
        n, jobs, text = line.rstrip("\n").split(" ", 2)
        row = measure(engine, text, int(n), int(jobs))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if scheduler == "cosy" and len(rows) > 1:
        from cosy.workers.engines.cosyvoice_setup import TARGET_RTF, save_capacity

        fits = [r["streams"] for r in rows if r["rtf"] is not None and r["rtf"] <= TARGET_RTF and not r["failed"]]
        path = save_capacity(engine, max(fits) if fits else 1, {r["streams"]: r["rtf"] for r in rows}, "cosy bench gpu")
        where = f"stored in {path}" if path else "not stored (the cache folder cannot be written: see the warning)"
        print(f"  capacity {max(fits) if fits else 1} {where}", file=sys.stderr, flush=True)
    engine.close()


# --- the parent: both schedulers, one after the other ---------------------------------------------------------


def _line(child: subprocess.Popen) -> dict[str, Any]:
    assert child.stdout is not None
    while True:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark child ended ({child.wait()}): see its output above")
        if line.startswith("{"):  # the library prints to stdout too
            return json.loads(line)


def tiny_model(root: Path) -> Path:
    """The tests' generated tiny CosyVoice2 model and a voice, made once under ``root``."""
    model = root / "model"
    if not (model / "llm.pt").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_cosyvoice import make_tiny_model

        make_tiny_model(model)
    return model


def _why_not(device: str, model_dir: str | None) -> str | None:
    probe = subprocess.run([sys.executable, "-c", "import torch, cosyvoice, sys; "
                            "sys.exit(0 if torch.cuda.is_available() else 3)"], capture_output=True, timeout=300)
    if probe.returncode not in (0, 3):
        return "torch or the CosyVoice library is not importable here (scripts/setup-cosyvoice-env.sh, docs/gpu.md)"
    if device == "cuda" and probe.returncode == 3:
        return "no CUDA (use --device cpu for the tiny model on the CPU)"
    if device == "cuda" and not model_dir:
        return "no model folder: --model-dir DIR or COSY_MODEL_DIR (bench/full_cosyvoice.py makes a random one)"
    return None


def run(out_dir: Path, quick: bool = False, device: str = "auto", model_dir: str | None = None) -> dict[str, Any]:
    model_dir = model_dir or os.environ.get("COSY_MODEL_DIR")
    if device == "auto":
        device = "cuda" if model_dir else "cpu"
    base = {"suite": "gpu", "device": device, "machine": C.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    why = _why_not(device, model_dir)
    if why:
        print(f"  skipped: {why}")
        return {**base, "skipped": why}
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, even on a machine with a GPU
        if not model_dir:
            root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cosy" / "bench-tiny"
            model_dir = str(tiny_model(root))
    text = os.environ.get("COSY_BENCH_GPU_TEXT") or TEXTS[device]
    wanted = [int(x) for x in os.environ.get("COSY_BENCH_GPU_STREAMS", "").split(",") if x.strip()]
    streams = tuple(wanted) or STREAMS[device]
    per_stream = 1 if quick else JOBS_PER_STREAM
    order = [s.strip() for s in os.environ.get("COSY_BENCH_GPU_SCHEDULERS", "").split(",") if s.strip()]
    schedulers = tuple(s for s in order if s in SCHEDULERS) or SCHEDULERS
    rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    for scheduler in schedulers:
        child = subprocess.Popen([sys.executable, "-m", "cosy.bench.gpu", "serve", model_dir, scheduler,
                                  str(max(streams))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
        try:
            infos[scheduler] = _line(child)
            print(f"  {scheduler}: loaded in {infos[scheduler]['load_s']} s, warm in {infos[scheduler]['warm_up_s']} s "
                  f"({infos[scheduler]['device']}, {infos[scheduler]['engine_model']})", file=sys.stderr, flush=True)
            assert child.stdin is not None
            for n in streams:
                child.stdin.write(f"{n} {per_stream} {text}\n")
                child.stdin.flush()
                row = {"scheduler": scheduler, **_line(child)}
                rows.append(row)
                print(f"  {scheduler} {n} streams: {json.dumps(row)}", file=sys.stderr, flush=True)
            child.stdin.close()
            child.wait(300)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    by = {(r["scheduler"], r["streams"]): r for r in rows}
    ratios = []
    for n in streams:
        cosy, lib = by.get(("cosy", n)), by.get(("library", n))
        if cosy and lib:
            ratios.append({"streams": n, "ttfc_ratio": C.ratio(cosy["first_chunk_p50_ms"], lib["first_chunk_p50_ms"]),
                           "throughput_ratio": C.ratio(cosy["audio_s_per_s"] or 0, lib["audio_s_per_s"] or 0)})
    targets = {}
    for name, (key, n, limit, op) in TARGETS[device].items():
        source = next((r for r in ratios if r["streams"] == n), None) if key.endswith("ratio") else by.get(("cosy", n))
        value = source.get(key) if source else None
        targets[name] = None if value is None else (value <= limit if op == "<=" else value >= limit)
    data = {**base, "model_dir": model_dir, "text": text, "text_bytes": len(text.encode()),
            "jobs_per_stream": per_stream, "rows": rows, "ratios": ratios, "targets": targets, "engines": infos}
    print(C.table(["scheduler", "streams", "first chunk p50 ms", "p99", "audio s/s", "RTF", "jobs", "failed"],
                  [[r["scheduler"], r["streams"], r["first_chunk_p50_ms"], r["first_chunk_p99_ms"], r["audio_s_per_s"],
                    r["rtf"], r["jobs"], r["failed"]] for r in rows]))
    print(C.table(["streams", "first chunk cosy/library", "throughput cosy/library"],
                  [[r["streams"], r["ttfc_ratio"], r["throughput_ratio"]] for r in ratios]))
    for name, ok in targets.items():
        print(f"  target {name}: {'met' if ok else 'missed' if ok is not None else 'not measured'}")
    groups = [f"{n} streams" for n in streams]
    C.bar_plot(out_dir, "gpu", f"CosyVoice first chunk p50 ({device})", groups,
               {s: [by[(s, n)]["first_chunk_p50_ms"] if (s, n) in by else 0 for n in streams] for s in schedulers},
               "ms", log=True)
    C.bar_plot(out_dir, "gpu-throughput", f"CosyVoice audio seconds per second ({device})", groups,
               {s: [(by[(s, n)]["audio_s_per_s"] or 0) if (s, n) in by else 0 for n in streams] for s in schedulers},
               "audio s / s")
    return data


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
