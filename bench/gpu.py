"""`cosy bench gpu`: the cosyvoice engine through broker + worker, time to first chunk and RTF at 1/4/8 streams
in flight on one GPU, against a direct in-process call of the CosyVoice library (the floor) in the same run.

Runs only where CUDA and a CosyVoice model folder exist: COSY_MODEL_DIR must name a folder with
cosyvoice2.yaml / cosyvoice3.yaml; otherwise it says why and skips. COSY_BENCH_GPU_TEXT replaces the text
(with bench/full_cosyvoice.py's random model a text of n bytes always gives 0.8 n seconds of audio) and
COSY_BENCH_GPU_STREAMS the stream counts (default 1,4,8).

Both sides load the model once, side by side (the floor in a child process, `python -m cosy.bench.gpu floor
MODEL_DIR - TEXT JOBS CAPACITY`, the worker behind a broker), and are then measured one after the other for each
N (floor, then cosy), so the GPU is never shared while timing and a run cut short still has whole rows (each
printed as it is done). Each side keeps N jobs in flight until 3 N (--quick: 2 N) are done (a closed loop),
timing each job's first chunk; RTF is the loop's wall time over the audio seconds it produced. The floor's N
threads call the library's `inference_zero_shot(..., stream=True)` directly with the voice's cached prompt
features (the same call the engine makes, minus broker, worker and sockets). The library's shared
`token_hop_len` is reset before each floor job, as the engine does, or every job after a thread's first would
start with a larger first chunk. `python -m cosy.bench.gpu floor MODEL_DIR 1,4,8 TEXT` runs the floor alone.

Measured on an H100 with bench/full_cosyvoice.py's model, the library runs at RTF about 2 (docs/performance.md):
a full run at 1/4/8 with --quick and a 6-byte text takes about 10 minutes.
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
from cosy.bench.loop import CosyLoopClient, closed_loop

TEXT = "Streaming speech should start quickly, and keep flowing while the rest of the sentence is still rendered."
STREAMS = (1, 4, 8)
JOBS_PER_STREAM = 3


def _why_not() -> str | None:
    model = os.environ.get("COSY_MODEL_DIR")
    if not model or not any((Path(model) / f).is_file() for f in ("cosyvoice2.yaml", "cosyvoice3.yaml")):
        return "no CosyVoice model folder (set COSY_MODEL_DIR)"
    probe = subprocess.run([sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"],
                           capture_output=True, timeout=120)
    if probe.returncode != 0:
        return "no CUDA (torch missing or no GPU visible)"
    return None


def _ms(seconds: list[float]) -> dict[str, float]:
    k = C.ms_summary(seconds)
    return {"p50": round(k["p50"], 1), "p99": round(k["p99"], 1), "n": k["n"]}


class Floor:
    """The library loaded in this process (through the engine's loader, so fp16, hop isolation and the cached
    prompt features are the same as the worker's), called directly."""

    def __init__(self, model_dir: str, capacity: int, text: str) -> None:
        import torch

        from cosy.workers.engines import SynthesisRequest, load_engine

        t0 = time.perf_counter()
        self.engine = load_engine("cosyvoice", model_dir=model_dir, capacity=str(capacity))
        self.load_s = time.perf_counter() - t0
        self.text = text
        self.voice = self.engine.default_voice
        self.tts = self.engine._tts  # the library object itself: called directly, without cosy's worker
        self.spk = self.engine._speaker(self.voice)
        self.empty_prompt = "" if self.engine._prompt_kind == "path" else torch.zeros(1, 0)
        for _ in self.engine.synthesize(SynthesisRequest(text, self.voice)):  # warm-up: CUDA kernels, allocator
            pass
        self.info = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "engine_model": self.engine.model, "voice": self.voice,
                     "load_s": round(self.load_s, 1)}

    def _jobs(self, count: int, ttfc: list[float], samples: list[int], lock: threading.Lock) -> None:
        hop = self.engine._hop
        for _ in range(count):
            if hop is not None:
                hop.reset()
            t_job = time.perf_counter()
            first = None
            n = 0
            for o in self.tts.inference_zero_shot(self.text, "", self.empty_prompt, zero_shot_spk_id=self.spk,
                                                  stream=True):
                if first is None:
                    first = time.perf_counter() - t_job
                n += o["tts_speech"].shape[-1]
            with lock:
                ttfc.append(first if first is not None else float("nan"))
                samples.append(n)

    def measure(self, streams: int, jobs_per_stream: int) -> dict[str, Any]:
        """`streams` threads, each running `jobs_per_stream` jobs back to back."""
        ttfc: list[float] = []
        samples: list[int] = []
        lock = threading.Lock()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=self._jobs, args=(jobs_per_stream, ttfc, samples, lock))
                   for _ in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rate = self.engine.sample_rate
        audio_s = sum(samples) / rate
        return {"ttfc_ms": _ms(ttfc), "rtf": round(wall / audio_s, 4) if audio_s else None,
                "audio_s_per_job": round(statistics.fmean(samples) / rate, 3) if samples else None,
                "jobs": len(samples), "wall_s": round(wall, 2)}


def floor(model_dir: str, streams: list[int], text: str, jobs_per_stream: int = JOBS_PER_STREAM) -> dict[str, Any]:
    """Direct library calls for each N in `streams`."""
    fl = Floor(model_dir, max(streams), text)
    out: dict[str, Any] = {**fl.info, "streams": {}}
    for n in streams:
        out["streams"][str(n)] = fl.measure(n, jobs_per_stream)
        print(f"  floor {n} streams: {json.dumps(out['streams'][str(n)])}", file=sys.stderr, flush=True)
    fl.engine.close()
    return out


def _serve_floor(model_dir: str, capacity: int, text: str, jobs_per_stream: int) -> None:
    """The child's side of run(): load, print the info line, then one result line per N read from stdin."""
    fl = Floor(model_dir, capacity, text)
    print(json.dumps(fl.info), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(fl.measure(int(line), jobs_per_stream)), flush=True)
    fl.engine.close()


def _floor_line(child: subprocess.Popen) -> dict[str, Any]:
    assert child.stdout is not None
    while True:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor process ended ({child.wait()}): see its output above")
        if line.startswith("{"):  # the library prints to stdout too
            return json.loads(line)


class _CountingClient(CosyLoopClient):
    """cosy's client, also adding up the audio of completed jobs (for RTF)."""

    def __init__(self, runtime_dir: Path, text: str) -> None:
        super().__init__(runtime_dir, text=text)
        self.samples = 0
        self.rate = 0

    def on_completed(self, event: Any) -> None:
        self.samples += len(event.audio)
        self.rate = event.sample_rate


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    why = _why_not()
    if why:
        print(f"  skipped: {why}")
        return {"suite": "gpu", "skipped": why, "machine": C.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    model = os.environ["COSY_MODEL_DIR"]
    text = os.environ.get("COSY_BENCH_GPU_TEXT") or TEXT
    per_stream = 2 if quick else JOBS_PER_STREAM
    wanted = [int(x) for x in os.environ.get("COSY_BENCH_GPU_STREAMS", "").split(",") if x.strip()]
    stream_counts = tuple(wanted) or STREAMS
    rows = []
    procs = C.Procs("cosy-bg-")
    child = subprocess.Popen([sys.executable, "-m", "cosy.bench.gpu", "floor", model, "-", text, str(per_stream),
                              str(max(stream_counts))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        procs.broker()
        t_load = time.perf_counter()
        procs.worker("cosyvoice", "bench-gpu", {"model_dir": model, "capacity": max(stream_counts)})
        fl = _floor_line(child)  # both load at once; the GPU is idle for one while the other is measured
        procs.wait_workers(1, timeout=600)
        worker_load_s = time.perf_counter() - t_load
        print(f"  loaded: floor {fl['load_s']} s, worker {worker_load_s:.0f} s ({fl['gpu']}, {fl['engine_model']})",
              file=sys.stderr, flush=True)
        client = _CountingClient(procs.dir, text)
        try:
            warm = closed_loop(client, 1, 1, 600)  # warm-up: CUDA kernels, allocator
            if len(warm.total_s) != 1:
                raise RuntimeError(f"the warm-up job did not complete; worker log: {procs.log('bench-gpu')}")
            for n in stream_counts:  # floor, then cosy, per N: a run cut short still has whole rows
                assert child.stdin is not None
                child.stdin.write(f"{n}\n")
                child.stdin.flush()
                f = _floor_line(child)
                print(f"  floor {n} streams: {json.dumps(f)}", file=sys.stderr, flush=True)
                client.samples = 0
                res = closed_loop(client, n, per_stream * n, 900)
                audio_s = client.samples / client.rate if client.rate else 0.0
                k = _ms(res.ttfc_s)
                rows.append({"streams": n, "ttfc_p50_ms": k["p50"], "ttfc_p99_ms": k["p99"], "jobs": len(res.total_s),
                             "failed": res.failed, "rtf": round(res.elapsed_s / audio_s, 4) if audio_s else None,
                             "audio_s_per_job": round(audio_s / len(res.total_s), 3) if res.total_s else None,
                             "floor_ttfc_p50_ms": f["ttfc_ms"]["p50"], "floor_ttfc_p99_ms": f["ttfc_ms"]["p99"],
                             "floor_rtf": f["rtf"], "floor_audio_s_per_job": f["audio_s_per_job"],
                             "ratio_p50": C.ratio(k["p50"], f["ttfc_ms"]["p50"]),
                             "rtf_ratio": C.ratio(res.elapsed_s / audio_s, f["rtf"]) if audio_s and f["rtf"] else None,
                             "jobs_per_s": round(res.jobs_per_s, 3)})
                print(f"  cosy {n} streams: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        finally:
            client.close()
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        procs.stop()
    by_n = {r["streams"]: r for r in rows}
    data = {"suite": "gpu", "model_dir": model, "text": text, "jobs_per_stream": per_stream, "streams": rows,
            "gpu": fl["gpu"], "torch": fl["torch"], "engine_model": fl["engine_model"], "voice": fl["voice"],
            "floor_load_s": fl["load_s"], "worker_load_s": round(worker_load_s, 1), "machine": C.machine(),
            "targets": {"<= 150 ms at 1 stream": by_n[1]["ttfc_p50_ms"] <= 150 if 1 in by_n else None,
                        "<= 400 ms at 4 streams": by_n[4]["ttfc_p50_ms"] <= 400 if 4 in by_n else None},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    print(C.table(["streams", "cosy ttfc p50", "p99", "library p50", "p99", "ratio", "cosy RTF", "library RTF",
                   "jobs/s"],
                  [[r["streams"], r["ttfc_p50_ms"], r["ttfc_p99_ms"], r["floor_ttfc_p50_ms"], r["floor_ttfc_p99_ms"],
                    r["ratio_p50"], r["rtf"], r["floor_rtf"], r["jobs_per_s"]] for r in rows]))
    C.bar_plot(out_dir, "gpu", "CosyVoice time to first chunk, p50", [f"{r['streams']} streams" for r in rows],
               {"cosy": [r["ttfc_p50_ms"] for r in rows], "library in-process": [r["floor_ttfc_p50_ms"] for r in rows]},
               "ms")
    return data


if __name__ == "__main__" and sys.argv[1:2] == ["floor"]:
    # floor MODEL_DIR 1,4,8 TEXT [JOBS_PER_STREAM]: measure each N, print one JSON object
    # floor MODEL_DIR - TEXT JOBS_PER_STREAM CAPACITY: load, then measure each N read from stdin (used by run())
    _per = int(sys.argv[5]) if len(sys.argv) > 5 else JOBS_PER_STREAM
    if sys.argv[3] == "-":
        _serve_floor(sys.argv[2], int(sys.argv[6]) if len(sys.argv) > 6 else max(STREAMS), sys.argv[4], _per)
    else:
        print(json.dumps(floor(sys.argv[2], [int(x) for x in sys.argv[3].split(",")], sys.argv[4], _per)))
