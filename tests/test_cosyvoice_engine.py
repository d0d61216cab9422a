"""The cosyvoice engine on a generated tiny model, through the real CosyVoice library, on the CPU.

Library tests need torch, torchaudio, onnx and the CosyVoice library in the running interpreter: CI makes
them with scripts/setup-cosyvoice-env.sh and runs `.venv-cosyvoice/bin/python -m pytest` on this file;
elsewhere they skip. The NVML, TensorRT-plan and hop-length helpers are tested everywhere.

Numbers for the tiny model (tests/tiny_cosyvoice.py): 25 speech tokens/s, 960 samples per token at
24 kHz, always ``20 x bytes of text`` tokens; the first streamed chunk is ``token_hop_len`` (25) tokens
(the 2 s prompt is 50 tokens, a whole number of hops, so no padding) less the vocoder's held-back
overlap (8 mel frames x 480 samples).
"""

from __future__ import annotations

import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cosyvoice_env import MISSING, REASON, needs_library
from stack import Stack, read_wav

from cosy import gpu
from cosy.workers.engines.base import EngineError, SynthesisRequest
from cosy.workers.engines.cosyvoice import PerThreadHop, ensure_trt_plan, isolate_hop_len, scan_voices, trt_plan_key

HOP = 25
FIRST_HOP = 15  # scheduler=cosy: the first chunk after 15 tokens (+ 3 look-ahead)
FIRST_CHUNK = {"library": HOP * 960 - 8 * 480, "cosy": FIRST_HOP * 960 - 8 * 480}  # 20160 / 10560 samples


# --- everywhere: NVML, TensorRT plan, hop isolation -------------------------------------------


class FakeNvml(types.ModuleType):
    """A stand-in for the pynvml module: two GPUs with fixed readings (power not supported on one)."""

    class NVMLError(Exception):
        pass

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i >= 2:
            raise self.NVMLError("Invalid Argument")
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return types.SimpleNamespace(gpu=42, memory=10)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 55

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:
            raise self.NVMLError("Not Supported")
        return 123_456  # milliwatts


def test_gpu_metrics_through_a_stand_in_nvml_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # the real import path: `import pynvml`
    assert gpu.count_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    mon = gpu.GpuMonitor()
    m = mon.metrics()
    assert m == {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_mem_used_mb": 3072.0, "gpu_mem_total_mb": 81920.0,
                 "gpu_util_pct": 42.0, "gpu_temp_c": 55.0}  # device 1 has no power reading: left out
    assert gpu.describe(m) == "3072/81920 MB 42% 55°C"
    assert gpu.GpuMonitor(0, nvml=fake).metrics()["gpu_power_w"] == pytest.approx(123.5, abs=0.1)
    mon.close()
    assert fake.shutdowns >= 2


def test_no_gpu_path_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert gpu.count_gpus() == 0
    mon = gpu.GpuMonitor()
    assert not mon.available and mon.metrics() == {}
    assert gpu.describe({}) == gpu.describe({"jobs_done": 3}) == "no GPU"

    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    assert gpu.count_gpus(NoDriver()) == 0
    assert gpu.GpuMonitor(nvml=NoDriver()).metrics() == {}
    assert gpu.GpuMonitor(5, nvml=FakeNvml()).metrics() == {}  # no such device


@pytest.mark.skipif(gpu.count_gpus() == 0, reason="no NVIDIA GPU (NVML) here: the stand-in NVML test covers the code")
def test_real_nvml_reads_the_gpu() -> None:
    mon = gpu.GpuMonitor(0)
    m = mon.metrics()
    mon.close()
    assert m["gpu_name"] and m["gpu_mem_total_mb"] > 1000 and 0 <= m["gpu_mem_used_mb"] <= m["gpu_mem_total_mb"]
    assert 0 <= m["gpu_util_pct"] <= 100 and 0 < m["gpu_temp_c"] < 120
    assert gpu.describe(m) != "no GPU"


def test_nvml_index_follows_cuda_visible_devices() -> None:
    assert gpu.nvml_index("") == 0
    assert gpu.nvml_index("3,1") == 3
    assert gpu.nvml_index("GPU-8f2a") == "GPU-8f2a"


def test_trt_plan_is_built_once_under_a_lock_and_atomically(tmp_path: Path) -> None:
    builds: list[Path] = []
    gate = threading.Barrier(4)

    def build(tmp: Path) -> None:
        builds.append(tmp)
        assert not (tmp_path / "k.plan").exists()  # nobody sees a half-written plan
        tmp.write_bytes(b"plan")

    def start() -> None:
        gate.wait()
        results.append(ensure_trt_plan(tmp_path, "k", build))

    results: list[Path] = []
    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(builds) == 1 and results == [tmp_path / "k.plan"] * 4
    assert (tmp_path / "k.plan").read_bytes() == b"plan"

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        ensure_trt_plan(tmp_path, "other", broken)
    assert not (tmp_path / "other.plan").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_trt_plan_key_names_gpu_trt_version_and_precision(tmp_path: Path) -> None:
    onnx_file = tmp_path / "flow.decoder.estimator.fp32.onnx"
    onnx_file.write_bytes(b"x")
    a = trt_plan_key("NVIDIA H100 80GB HBM3", "10.13.3.9", True, onnx_file)
    assert "NVIDIA-H100-80GB-HBM3" in a and "trt10.13.3.9" in a and ".fp16." in a
    assert a != trt_plan_key("NVIDIA L4", "10.13.3.9", True, onnx_file)
    assert a != trt_plan_key("NVIDIA H100 80GB HBM3", "10.14.1", True, onnx_file)
    assert a != trt_plan_key("NVIDIA H100 80GB HBM3", "10.13.3.9", False, onnx_file)


def test_hop_length_is_per_thread_and_reset_per_job() -> None:
    class Model:  # the library's pattern: the instance attribute that tts() grows
        def __init__(self) -> None:
            self.token_hop_len = 25

        def grow(self) -> None:
            self.token_hop_len = min(100, self.token_hop_len * 2)

    model = Model()
    hop = isolate_hop_len(model)
    assert isinstance(hop, PerThreadHop) and isinstance(model, Model)
    model.grow()
    model.grow()
    assert model.token_hop_len == 100
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(model.token_hop_len))
    t.start()
    t.join()
    assert seen == [25]  # another thread starts from the initial hop
    hop.reset()
    assert model.token_hop_len == 25
    assert isolate_hop_len(object()) is None


def test_voice_folders_are_read_and_broken_ones_skipped(tmp_path: Path) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "voice.json").write_text('{"name": "good", "transcript": "Hi.", "audio": "a.wav"}')
    (tmp_path / "good" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "voice.json").write_text("{not json")
    (tmp_path / "noaudio").mkdir()
    (tmp_path / "noaudio" / "voice.json").write_text('{"name": "noaudio", "transcript": "x"}')
    voices = scan_voices([tmp_path, tmp_path / "missing"])
    assert list(voices) == ["good"] and voices["good"].transcript == "Hi."


def test_status_says_where_a_worker_capacity_came_from() -> None:
    from rich.console import Console

    from cosy.cli.status import render

    def worker(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "pid": 1, "engine": "cosyvoice", "model": "CosyVoice2", "device": "cuda:0",
                "state": "idle", "running": 0, "capacity": 6, "jobs_done": 0, "metrics": metrics}

    st = {"broker": {"pid": 1, "uptime_s": 5, "version": "0", "endpoints": {"front": "ipc://x"}}, "queue": {},
          "running": 0, "counters": {"done": 0, "failed": 0, "retried": 0, "rejected": 0},
          "workers": [worker("measured", {"capacity_source": "warm-up"}), worker("swept", {"capacity_source": "bench"}),
                      worker("plain", {})]}
    console = Console(width=200, record=True)
    console.print(render(st, console.width))
    lines = {line.split()[1]: line for line in console.export_text().splitlines() if "cosyvoice" in line}
    assert "0/6 (measured)" in lines["measured"] and "0/6 (bench)" in lines["swept"]
    assert "(" not in lines["plain"].split("0/6")[1].split()[0]


# --- the real library on the tiny model -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_cosyvoice import make_tiny_model, make_voice

    root = tmp_path_factory.mktemp("cosyvoice")
    voices = root / "voices"
    make_voice(voices, "tiny")
    return {"model": make_tiny_model(root / "model"), "voices": voices, "cache": root / "cache"}


@pytest.fixture(scope="module", params=["cosy", "library"])
def engine(request: pytest.FixtureRequest, tiny: dict[str, Path]) -> Iterator[Any]:
    """The engine on each scheduler (cosy's pipeline, the library's own loop), each with a cache folder of its own."""
    if MISSING:
        pytest.skip(REASON)
    import shutil

    from cosy.workers.engines import load_engine

    voices = tiny["voices"].parent / f"voices-{request.param}"
    shutil.copytree(tiny["voices"], voices)
    eng = load_engine("cosyvoice", model_dir=str(tiny["model"]), voices_dir=str(voices),
                      cache_dir=str(tiny["cache"] / request.param), text_frontend="false", capacity="2",
                      scheduler=request.param)
    assert eng.scheduler == request.param
    yield eng
    eng.close()


def _expected_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _run(engine: Any, text: str, voice: str = "tiny") -> list[np.ndarray]:
    return [np.array(c, copy=True) for c in engine.synthesize(SynthesisRequest(text, voice))]


@needs_library
def test_loads_through_the_library_and_streams_float_chunks(engine: Any) -> None:
    import logging

    assert engine.sample_rate == 24000 and engine.device == _expected_device() and engine.family == "CosyVoice2"
    assert logging.getLogger().level != logging.DEBUG  # the library's basicConfig(DEBUG) was undone
    assert [v.name for v in engine.voices()] == ["tiny"] and engine.default_voice == "tiny"
    chunks = _run(engine, "Hi")
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    assert len(chunks) >= 2 and len(chunks[0]) == FIRST_CHUNK[engine.scheduler]  # streamed, not one block
    assert sum(len(c) for c in chunks) == 2 * 20 * 960  # "Hi": 2 bytes x 20 tokens x 960 samples
    assert all(np.isfinite(c).all() and np.abs(c).max() <= 1.0 for c in chunks)
    assert engine.metrics()["voice_prompts_computed"] == 1


@needs_library
def test_concurrent_jobs_each_get_the_first_chunk_they_should(engine: Any) -> None:
    _run(engine, "Hi there")  # several chunks: the library grows its hop length while streaming
    first: dict[str, int] = {}
    errors: list[BaseException] = []

    def job(text: str) -> None:
        try:
            for chunk in engine.synthesize(SynthesisRequest(text, "tiny")):
                first.setdefault(text, len(chunk))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(t,)) for t in ("Hey you", "Hello!!")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert first == {"Hey you": FIRST_CHUNK[engine.scheduler], "Hello!!": FIRST_CHUNK[engine.scheduler]}
    assert _run(engine, "Hi")[0].size == FIRST_CHUNK[engine.scheduler]  # and the job after them too


@needs_library
def test_a_job_does_not_write_its_text_into_the_shared_speaker_cache(engine: Any) -> None:
    # The library's frontend_zero_shot writes the request's text into the cached speaker entry it
    # reads; concurrent jobs on one voice would then race for it. The engine hands out copies.
    _run(engine, "Hey you")
    cache = engine._tts.frontend.spk2info
    assert cache and all("text" not in dict.__getitem__(cache, key) for key in cache)


@needs_library
def test_prompt_features_are_computed_once_and_new_voices_appear(engine: Any, tiny: dict[str, Path]) -> None:
    from tiny_cosyvoice import make_voice

    before = engine.metrics()["voice_prompts_computed"]
    _run(engine, "Ok")
    assert engine.metrics()["voice_prompts_computed"] == before  # reused, not recomputed
    assert len(list((tiny["cache"] / engine.scheduler / "prompts").rglob("*.pt"))) == 1  # persisted for a restart
    make_voice(engine._voice_dirs[0], "late", seconds=1.5, transcript="Added while running.")
    chunks = _run(engine, "Ok", voice="late")  # no restart
    assert sum(len(c) for c in chunks) == 2 * 20 * 960
    assert engine.metrics()["voice_prompts_computed"] == before + 1
    assert "late" in [v.name for v in engine.voices()]
    with pytest.raises(EngineError, match="not available"):
        _run(engine, "Ok", voice="nobody")


@needs_library
def test_speed_is_applied_without_streaming(engine: Any) -> None:
    chunks = _run_speed(engine, "Hi", 2.0)
    assert len(chunks) == 1  # the library applies speed only in its non-streaming mode
    assert abs(len(chunks[0]) - 2 * 20 * 960 / 2) <= 960


def _run_speed(engine: Any, text: str, speed: float) -> list[np.ndarray]:
    return [np.array(c) for c in engine.synthesize(SynthesisRequest(text, "tiny", speed=speed))]


@needs_library
def test_oom_becomes_a_retryable_engine_error(engine: Any) -> None:
    import torch

    def exploding() -> Iterator[dict[str, Any]]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield {}

    with pytest.raises(EngineError) as info:
        list(engine._chunks(exploding(), SynthesisRequest("x", "tiny")))
    assert info.value.retryable and "out of memory" in str(info.value)
    assert _run(engine, "Ok")  # still usable


@needs_library
def test_broker_and_worker_stream_a_job_and_reuse_the_cached_voice(
        engine: Any, tiny: dict[str, Path], stack: Stack, tmp_path: Path) -> None:
    """A real worker process (same cache dir as the engine above: a restart) behind a real broker."""
    from cosy.client import Audio, Client, Completed, JobSpec

    name = "cv"
    stack.start_worker("cosyvoice", name=name, wait=False, options={
        "model_dir": tiny["model"], "voices_dir": engine._voice_dirs[0], "cache_dir": tiny["cache"] / engine.scheduler,
        "text_frontend": "false", "capacity": 2, "scheduler": engine.scheduler})
    info = stack.wait_worker(name, timeout=150)
    assert info["engine"] == "cosyvoice" and info["sample_rate"] == 24000 and info["capacity"] == 2
    assert sorted(info["voices"]) == ["late", "tiny"]

    out = tmp_path / "x.wav"
    stack.cosy("say", "Hi", "--voice", "tiny", "--no-play", "--out", str(out), timeout=120, check=True)
    audio, rate = read_wav(out)
    assert rate == 24000 and len(audio) == 2 * 20 * 960

    first: dict[str, int] = {}
    done: dict[str, Completed] = {}
    with Client(stack.endpoints) as client:
        client.connect()
        jobs = {client_job: text for client_job, text in (("a" * 8, "Hey you"), ("b" * 8, "Hello!!"))}
        for job, text in jobs.items():
            client.submit(JobSpec(text, voice="tiny", job=job))
        deadline = time.monotonic() + 120
        while len(done) < 2 and time.monotonic() < deadline:
            for ev in client.poll(0.05):
                assert not hasattr(ev, "code"), ev
                if isinstance(ev, Audio):
                    first.setdefault(ev.job, len(ev.pcm))
                elif isinstance(ev, Completed):
                    done[ev.job] = ev
    assert sorted(done) == sorted(jobs)
    assert first == {job: FIRST_CHUNK[engine.scheduler] for job in jobs}
    for job, text in jobs.items():
        assert done[job].sample_rate == 24000 and len(done[job].audio) == len(text) * 20 * 960

    # A job with its own prompt (zero-shot cloning without a registered voice) goes to this worker, which clones.
    t = np.arange(16000) / 16000
    prompt = (0.3 * 32767 * np.sin(2 * np.pi * 190 * t)).astype("<i2").tobytes()
    with Client(stack.endpoints) as client:
        client.connect()
        client.submit(JobSpec("Ok", job="cloned-1", prompt_audio=prompt, prompt_text="Its own words."))
        cloned = None
        deadline = time.monotonic() + 120
        while cloned is None and time.monotonic() < deadline:
            for ev in client.poll(0.05):
                assert not hasattr(ev, "code"), ev
                if isinstance(ev, Completed):
                    cloned = ev
    assert cloned is not None and len(cloned.audio) == 2 * 20 * 960

    worker = next(w for w in stack.status()["workers"] if w["name"] == name)
    assert worker["clone"] is True
    metrics = worker["metrics"]
    assert metrics["prompt_features_computed"] == 1
    assert metrics["scheduler"] == engine.scheduler and metrics["capacity_source"] == "option"

    assert metrics["voice_prompts_loaded"] == 2 and metrics["voice_prompts_computed"] == 0  # from the cache
    if _expected_device() == "cpu":
        assert gpu.describe(metrics) == "no GPU"
    else:  # on a GPU machine: real NVML figures in the heartbeats
        assert metrics["gpu_mem_total_mb"] > 0 and 0 < metrics["gpu_mem_used_mb"] <= metrics["gpu_mem_total_mb"]
