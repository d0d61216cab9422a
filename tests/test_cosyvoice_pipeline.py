"""cosy's CosyVoice pipeline (scheduler=cosy) on the generated tiny model, against the real library, on the CPU.

Like tests/test_cosyvoice_engine.py these need torch and the CosyVoice library in the running interpreter
(CI: .venv-cosyvoice); elsewhere they skip. The LLM runs in float64 here: a random tiny model has nearly flat
logits, so a batched and a single matrix product that round differently in float32 could flip a token.

The tiny model: 25 speech tokens/s, 960 samples per token at 24 kHz, 20 tokens per byte of text (its LLM never
stops early); the vocoder holds back 8 mel frames x 480 samples of every streamed chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cosyvoice_env import MISSING, needs_library

from cosy.workers.engines.base import CollectingSink, EngineError, SynthesisRequest

pytestmark = needs_library


SAMPLES_PER_TOKEN = 960
HELD_BACK = 8 * 480
TEXTS = {"a": "Hi there", "b": "Good morning!", "c": "Ok", "d": "Hello you two"}  # 20 tokens per byte
LONG = "A long sentence that would take the tiny model a good while to render, " * 2  # 2,880 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_cosyvoice import make_tiny_model, make_voice

    root = tmp_path_factory.mktemp("cosyvoice-pipeline")
    voices = root / "voices"
    make_voice(voices, "tiny")
    make_voice(voices, "other", seconds=3.1, transcript="Another reference voice, a little longer.")
    return {"model": make_tiny_model(root / "model"), "voices": voices, "cache": root / "cache"}


@pytest.fixture(scope="module")
def engine(tiny: dict[str, Path]) -> Iterator[Any]:
    from cosy.workers.engines import load_engine

    eng = load_engine("cosyvoice", model_dir=str(tiny["model"]), voices_dir=str(tiny["voices"]),
                      cache_dir=str(tiny["cache"]), text_frontend="false", capacity="4", llm_dtype="float64")
    assert eng.scheduler == "cosy"
    yield eng
    eng.close()


def _job(engine: Any, text: str, voice: str = "tiny", seed: int = 7, run: str | None = None,
         **kw: Any) -> tuple[SynthesisRequest, CollectingSink]:
    request = SynthesisRequest(text, voice, run=run or f"r-{text}-{voice}-{seed}-{time.monotonic_ns()}",
                               seed=seed, **kw)
    sink = CollectingSink()
    engine.start(request, sink)
    return request, sink


def _tokens(engine: Any, run: str) -> list[int]:
    pieces = [p for p in engine._pipeline.finished if p[0] == run]
    assert pieces, f"no finished piece for {run}"
    return [t for p in sorted(pieces, key=lambda p: p[1]) for t in p[2]]


class greedy:
    """Deterministic sampling for a comparison with the library: top-k 1 and Repetition Aware Sampling off
    (its threshold above the window), set on the library's own ``llm.sampling`` and read back by the pipeline."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __enter__(self) -> None:
        from cosy.workers.engines.sampling import SamplingRules

        llm = self.engine._tts.model.llm
        self.saved = llm.sampling
        func = llm.sampling.func if isinstance(llm.sampling, functools.partial) else llm.sampling
        llm.sampling = functools.partial(func, top_p=0.8, top_k=1, win_size=10, tau_r=2.0)
        self.lm = self.engine._pipeline.backend.lm
        self.rules = self.lm.rules
        self.lm.rules = SamplingRules.from_library(llm)
        assert self.lm.rules.top_k == 1 and self.lm.rules.repeat_threshold > self.lm.rules.win_size

    def __exit__(self, *exc: object) -> None:
        self.engine._tts.model.llm.sampling = self.saved
        self.lm.rules = self.rules


def _library_tokens(engine: Any, inputs: dict[str, Any]) -> list[int]:
    import torch

    llm = engine._tts.model.llm
    out = llm.inference(text=inputs["text"], text_len=torch.tensor([inputs["text"].shape[1]], dtype=torch.int32),
                        prompt_text=inputs["prompt_text"],
                        prompt_text_len=torch.tensor([inputs["prompt_text"].shape[1]], dtype=torch.int32),
                        prompt_speech_token=inputs["llm_prompt_speech_token"],
                        prompt_speech_token_len=torch.tensor([inputs["llm_prompt_speech_token"].shape[1]],
                                                             dtype=torch.int32),
                        embedding=inputs["llm_embedding"])
    return [int(t) for t in out]


# --- the same tokens and audio as the library --------------------------------------------------------------


def test_one_stream_gives_exactly_the_library_tokens(engine: Any) -> None:
    with greedy(engine):
        for text, voice in (("Hi there", "tiny"), ("Good morning!", "other")):
            request, sink = _job(engine, text, voice)
            sink.wait(120)
            inputs = engine.model_inputs(request)[0]
            ours, theirs = _tokens(engine, request.run), _library_tokens(engine, inputs)
            assert len(theirs) == len(text) * 20
            assert ours == theirs


def test_audio_equals_the_library_stream_for_the_same_chunk_boundaries(engine: Any) -> None:
    """With the library's own first hop (25 tokens; the tiny voice's 50 prompt tokens need no padding) cosy's chunks
    fall where the library's ``tts(stream=True)``'s fall, and each chunk's audio is what the library's ``token2wav``
    makes of the same tokens at the same boundaries. HiFT draws noise from torch's global generator, so every chunk
    starts from a known seed on both sides."""
    import torch

    pipeline = engine._pipeline
    schedule = pipeline.schedule
    vocoder = pipeline.vocoder
    model = engine._tts.model
    plain_chunk = vocoder.chunk
    seeds = iter(range(1000, 2000))

    def seeded_chunk(*args: Any, **kwargs: Any) -> np.ndarray:
        torch.manual_seed(next(seeds))
        return plain_chunk(*args, **kwargs)

    engine._hop.reset()
    hop = engine._hop.initial  # the loaded library's own schedule (the PyPI fork does not grow its hop)
    library_schedule = dataclasses.replace(schedule, first_hop=hop, hop=hop,
                                           max_hop=getattr(model, "token_max_hop_len", hop),
                                           scale=getattr(model, "stream_scale_factor", 1))
    pipeline.schedule = library_schedule
    vocoder.chunk = seeded_chunk
    try:
        with greedy(engine):
            request, sink = _job(engine, "Hello you", "tiny")
            ours = sink.wait(120)
            inputs = engine.model_inputs(request)[0]
            engine._hop.reset()
            library_stream = [o["tts_speech"].shape[-1] for o in model.tts(**inputs, stream=True)]
    finally:
        pipeline.schedule = schedule
        vocoder.chunk = plain_chunk
    assert [len(c) for c in ours] == library_stream and len(ours) >= 3

    (_, _, tokens, _), = [p for p in pipeline.finished if p[0] == request.run]
    key = "reference"
    model.hift_cache_dict[key] = None
    expected, offset, hops = [], 0, library_schedule.hops()
    try:
        hop = next(hops)
        with torch.inference_mode():
            for seed in range(1000, 2000):
                final = len(tokens) - offset < hop + schedule.lookahead
                end = len(tokens) if final else offset + hop + schedule.lookahead
                torch.manual_seed(seed)
                speech = model.token2wav(token=torch.tensor([tokens[:end]], dtype=torch.int32),
                                         prompt_token=inputs["flow_prompt_speech_token"],
                                         prompt_feat=inputs["prompt_speech_feat"], embedding=inputs["flow_embedding"],
                                         token_offset=offset, uuid=key, stream=not final, finalize=final)
                expected.append(speech.reshape(-1).numpy())
                if final:
                    break
                offset += hop
                hop = next(hops)
    finally:
        model.hift_cache_dict.pop(key, None)
    assert len(expected) == len(ours)
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


# --- batching is invisible ------------------------------------------------------------------------------------


def test_streams_batched_together_get_the_tokens_they_get_alone(engine: Any) -> None:
    """Four streams, two voices (different prompts), seeded sampling with the library's rules (top-k 25, top-p,
    Repetition Aware Sampling): decoded together, one joining mid-flight and one cancelled mid-flight, each gets
    exactly its tokens alone."""
    voices = {"a": "tiny", "b": "other", "c": "tiny", "d": "other"}
    alone = {}
    for key, text in TEXTS.items():
        request, sink = _job(engine, text, voices[key], seed=100 + ord(key))
        sink.wait(120)
        alone[key] = _tokens(engine, request.run)
    pipeline = engine._pipeline
    before = pipeline.largest_batch
    pipeline.largest_batch = 0
    try:
        jobs = {key: _job(engine, TEXTS[key], voices[key], seed=100 + ord(key)) for key in "abc"}
        victim_req, victim = _job(engine, LONG, "tiny", seed=5)
        wait_first_audio(jobs["a"][1])
        jobs["d"] = _job(engine, TEXTS["d"], voices["d"], seed=100 + ord("d"))  # joins mid-flight
        wait_first_audio(victim)
        engine.cancel(victim_req.run)  # leaves mid-flight
        for key, (request, sink) in jobs.items():
            sink.wait(120)
            assert _tokens(engine, request.run) == alone[key], key
        assert pipeline.wait_idle(30), (pipeline.streams, pipeline.active, pipeline.pending, pipeline.frontend_queue,
                                        victim.finished.is_set(), victim.error)
        assert pipeline.largest_batch >= 3  # they really were decoded together
        assert not [p for p in pipeline.finished if p[0] == victim_req.run]  # the cancelled one never finished
    finally:
        pipeline.largest_batch = max(before, pipeline.largest_batch)


def wait_first_audio(sink: CollectingSink, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not sink.chunks:
        assert not sink.finished.is_set(), sink.error
        assert time.monotonic() < deadline, "no audio in time"
        sink.finished.wait(0.005)


# --- the chunk schedule, and nothing sleeps ------------------------------------------------------------------


def test_first_chunk_after_exactly_first_hop_plus_lookahead_and_nothing_sleeps(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    schedule = engine._pipeline.schedule
    assert (schedule.first_hop, schedule.lookahead) == (15, 3)  # the default, the official Triton runtime's

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"time.sleep({seconds}) on the hot path")

    monkeypatch.setattr(time, "sleep", no_sleep)
    request, sink = _job(engine, "Hi there", "tiny")
    chunks = sink.wait(120)
    monkeypatch.undo()
    (run, _, tokens, scheduled), = [p for p in engine._pipeline.finished if p[0] == request.run]
    assert scheduled[0] == schedule.first_hop + schedule.lookahead  # handed over the moment its tokens existed
    assert len(chunks[0]) == schedule.first_hop * SAMPLES_PER_TOKEN - HELD_BACK
    assert sum(len(c) for c in chunks) == len(tokens) * SAMPLES_PER_TOKEN == 8 * 20 * SAMPLES_PER_TOKEN


def test_speed_is_applied_in_one_block(engine: Any) -> None:
    request, sink = _job(engine, "Hi", "tiny", speed=2.0)
    chunks = sink.wait(120)
    assert len(chunks) == 1 and abs(len(chunks[0]) - 2 * 20 * SAMPLES_PER_TOKEN / 2) <= SAMPLES_PER_TOKEN


# --- failure -------------------------------------------------------------------------------------------------


def test_an_exception_in_the_llm_loop_fails_its_jobs_retryably_within_a_second(engine: Any) -> None:
    pipeline = engine._pipeline
    fired: dict[str, float] = {}

    def fault(n: int) -> None:
        if n >= 2 and "t" not in fired:
            fired["t"] = time.monotonic()
            raise RuntimeError("injected LLM loop failure")

    pipeline.fault = fault
    try:
        sinks = [_job(engine, text, "tiny")[1] for text in ("Long enough text one", "Long enough text two")]
        for sink in sinks:
            assert sink.finished.wait(60)
    finally:
        pipeline.fault = None
    ended = time.monotonic()
    assert "t" in fired
    for sink in sinks:
        assert isinstance(sink.error, EngineError) and sink.error.retryable, sink.error
        assert "injected LLM loop failure" in str(sink.error)
    assert ended - fired["t"] < 1.0
    assert pipeline.wait_idle(10)
    _, sink = _job(engine, "Ok", "tiny")
    assert sum(len(c) for c in sink.wait(120)) == 2 * 20 * SAMPLES_PER_TOKEN  # the loop started again


def test_cuda_out_of_memory_lowers_the_admitted_batch(engine: Any) -> None:
    import torch

    pipeline = engine._pipeline
    saved = pipeline.max_batch

    def fault(n: int) -> None:
        if n >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    pipeline.fault = fault
    try:
        jobs = [_job(engine, text, "tiny", seed=i) for i, text in enumerate(("Text one", "Text two", "Text 3!"))]
        results = []
        for _, sink in jobs:
            sink.finished.wait(120)
            results.append(sink.error)
        failed = [e for e in results if e is not None]
        assert pipeline.max_batch == 1
        assert len(failed) >= 1 and all(isinstance(e, EngineError) and e.retryable and "out of memory" in str(e)
                                        for e in failed)
        assert any(e is None for e in results)  # the survivors went on
        retry = [_job(engine, "Text one", "tiny", seed=0)[1] for _ in failed]
        for sink in retry:
            assert sum(len(c) for c in sink.wait(120)) == 8 * 20 * SAMPLES_PER_TOKEN
    finally:
        pipeline.fault = None
        pipeline.max_batch = saved


# --- the engine interface for a batched engine ----------------------------------------------------------------


def test_cancel_stops_the_llm_work_and_frees_the_state(engine: Any) -> None:
    pipeline = engine._pipeline
    request, sink = _job(engine, LONG, "tiny")
    wait_first_audio(sink)
    engine.cancel(request.run)
    assert pipeline.wait_idle(10)
    assert pipeline.stats()["llm_active"] == 0
    assert not [p for p in pipeline.finished if p[0] == request.run]  # its LLM stream stopped before its end
    assert not engine._tts.model.hift_cache_dict  # no per-request state left in the library's dicts
    assert not sink.finished.is_set()  # a cancelled job gets nothing more


def test_a_job_reads_and_hashes_nothing(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The voice's reference audio and the model folder were read when the voice was prepared, never again."""
    import cosy.workers.engines.cosyvoice as cv

    _job(engine, "Ok", "tiny")[1].wait(120)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read or hashed during a job")

    monkeypatch.setattr(cv.hashlib, "sha256", forbidden)
    monkeypatch.setattr(Path, "read_bytes", forbidden)
    monkeypatch.setattr(Path, "glob", forbidden)
    chunks = _job(engine, "Ok", "other")[1].wait(120)
    assert sum(len(c) for c in chunks) == 2 * 20 * SAMPLES_PER_TOKEN


def test_the_socket_loop_never_waits_on_a_voice_being_prepared(engine: Any, tiny: dict[str, Path]) -> None:
    from tiny_cosyvoice import make_voice

    gate = threading.Event()
    entered = threading.Event()
    original = engine._tts.add_zero_shot_spk

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(60)
        return original(*args, **kwargs)

    engine._tts.add_zero_shot_spk = slow
    try:
        make_voice(tiny["voices"], "newcomer", seconds=1.5, transcript="A voice added while running.")
        _, sink = _job(engine, "Ok", "newcomer")
        assert entered.wait(30)  # the frontend thread is computing its features, holding the prepare lock
        answers: list[Any] = []
        probe = threading.Thread(target=lambda: answers.extend(
            [engine.refresh_voices(), [v.name for v in engine.voices()], engine.metrics()]))
        probe.start()
        probe.join(5)
        assert not probe.is_alive(), "refresh_voices/voices/metrics waited on the voice being prepared"
        assert "newcomer" in answers[1]
        assert not sink.finished.is_set()
        gate.set()
        assert sum(len(c) for c in sink.wait(120)) == 2 * 20 * SAMPLES_PER_TOKEN
    finally:
        gate.set()
        engine._tts.add_zero_shot_spk = original


def test_unknown_voice_fails_the_job_and_names_the_voices(engine: Any) -> None:
    _, sink = _job(engine, "Ok", "nobody")
    with pytest.raises(EngineError, match="not available.*tiny"):
        sink.wait(30)


# --- capacity -------------------------------------------------------------------------------------------------


def test_warm_up_measures_the_capacity_or_takes_it_from_a_bench_sweep(tiny: dict[str, Path]) -> None:
    from cosy.workers.engines import load_engine
    from cosy.workers.engines.cosyvoice_setup import capacity_file, save_capacity

    eng = load_engine("cosyvoice", model_dir=str(tiny["model"]), voices_dir=str(tiny["voices"]),
                      cache_dir=str(tiny["cache"]), text_frontend="false", max_batch="4")
    try:
        capacity_file(eng).unlink(missing_ok=True)
        eng.warm_up()
        assert eng.capacity_source == "warm-up" and 1 <= eng.capacity <= 4
        estimate = eng._pipeline_info["rtf_estimate"]
        assert set(estimate) == {1, 2, 4} and all(r > 0 for r in estimate.values())
        assert eng.capacity == max([b for b, r in estimate.items() if r <= 0.5], default=1)
        save_capacity(eng, 3, {1: 0.1, 2: 0.2, 3: 0.4, 4: 0.6}, "test")
        eng.warm_up()
        assert (eng.capacity, eng.capacity_source) == (3, "bench")
        assert eng.metrics()["capacity_source"] == "bench"
    finally:
        capacity_file(eng).unlink(missing_ok=True)
        eng.close()


# --- the sampler follows the library's rules ------------------------------------------------------------------


def test_the_vectorised_sampler_draws_as_the_library_does() -> None:
    """On fixed distributions, with and without a repetition in the window, cosy's batched sampler and the
    library's own ``ras_sampling`` give the same token frequencies (20,000 seeded draws each)."""
    import torch
    from cosyvoice.utils.common import ras_sampling

    from cosy.workers.engines.sampling import SamplingRules, sample

    rules = SamplingRules.from_library(type("LLM", (), {"sampling": functools.partial(
        ras_sampling, top_p=0.8, top_k=25, win_size=10, tau_r=0.1), "speech_token_size": 7})())
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    logp = logits.log_softmax(0)
    n = 20_000
    for window in ([], [0] * 3):  # no repetition; token 0 repeated (redrawn when chosen)
        torch.manual_seed(0)
        theirs = torch.tensor([int(ras_sampling(logp.clone(), list(window), 25, top_p=0.8, top_k=25, win_size=10,
                                                tau_r=0.1)) for _ in range(n)])
        padded = ([-1] * 10 + window)[-10:]
        gen = torch.Generator().manual_seed(1)
        ours = sample(logp.expand(n, -1).clone(), rules, torch.tensor([padded] * n), torch.full((n,), 5),
                      torch.zeros(n, dtype=torch.long), torch.rand(n, 2, generator=gen, dtype=torch.float64).float())
        f_theirs = torch.bincount(theirs, minlength=8).double() / n
        f_ours = torch.bincount(ours, minlength=8).double() / n
        assert (f_ours - f_theirs).abs().sum() < 0.03, (window, f_ours, f_theirs)
        assert f_ours[4:].sum() == 0 or window  # top-p 0.8 keeps the first four (0.45+0.27+0.17 > 0.8 at 3)
    # min_len forbids the end token
    eos = sample(torch.tensor([[0.0] + [-50.0] * 7]).log_softmax(1), dataclasses.replace(rules, eos=0),
                 torch.full((1, 10), -1), torch.tensor([0]), torch.tensor([1]), torch.tensor([[0.5, 0.5]]))
    assert int(eos) != 0


# --- the vllm backend's loop ----------------------------------------------------------------------------------


class StandInVllm:
    """vLLM's LLMEngine shape: add_request / step / abort_request; each request emits max_tokens ids, except that
    one with a long prompt (over 100 positions) stops after 40 and stays running (a long generation)."""

    def __init__(self) -> None:
        self.requests: dict[str, dict[str, Any]] = {}
        self.step_threads: set[int] = set()
        self.aborted: list[str] = []
        self.prompts: list[tuple[int, ...]] = []

    def add_request(self, request_id: str, prompt: dict[str, Any], params: dict[str, Any]) -> None:
        self.prompts.append(tuple(prompt["prompt_embeds"].shape))
        self.requests[request_id] = {"params": params, "ids": [], "long": prompt["prompt_embeds"].shape[0] > 100}

    def step(self) -> list[Any]:
        from types import SimpleNamespace

        self.step_threads.add(threading.get_ident())
        out = []
        for rid, req in list(self.requests.items()):
            if req["long"] and len(req["ids"]) >= 40:
                continue
            req["ids"].append((len(req["ids"]) * 7 + len(rid)) % 64)
            finished = len(req["ids"]) >= req["params"]["max_tokens"]
            out.append(SimpleNamespace(request_id=rid, finished=finished,
                                       outputs=[SimpleNamespace(token_ids=list(req["ids"]))]))
            if finished:
                del self.requests[rid]
        return out

    def abort_request(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)


def test_the_vllm_backend_steps_every_stream_from_the_loop_thread(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from cosy.workers.engines.cosyvoice_pipeline import Pipeline
    from cosy.workers.engines.cosyvoice_setup import token_limits
    from cosy.workers.engines.vllm_loop import VllmBackend

    vllm = StandInVllm()
    llm = engine._tts.model.llm
    backend = VllmBackend(vllm, llm, slots=4, rules=engine._pipeline.backend.lm.rules,
                          params=lambda rules, stop, lo, hi, seed: {"max_tokens": hi, "min_tokens": lo, "seed": seed})
    pipeline = Pipeline(backend, engine._pipeline.vocoder, engine.model_inputs, engine._pipeline.schedule,
                        token_limits)

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"time.sleep({seconds}) in the vLLM loop")

    monkeypatch.setattr(time, "sleep", no_sleep)
    try:
        texts = ("Hi", "Hey you", "Okay")
        sinks = []
        for i, text in enumerate(texts):
            sink = CollectingSink()
            pipeline.submit(SynthesisRequest(text, "tiny", run=f"v{i}", seed=i), sink)
            sinks.append(sink)
        victim = CollectingSink()
        pipeline.submit(SynthesisRequest(LONG, "tiny", run="victim"), victim)
        for text, sink in zip(texts, sinks, strict=True):
            assert sum(len(c) for c in sink.wait(120)) == len(text) * 20 * SAMPLES_PER_TOKEN
        wait_first_audio(victim)
        pipeline.cancel("victim")
        assert pipeline.wait_idle(30)
    finally:
        pipeline.close()
    assert len(vllm.step_threads) == 1  # one thread steps vLLM for every stream
    assert len(vllm.aborted) == 1 and not vllm.requests  # the cancelled request was aborted in vLLM
    assert all(len(shape) == 2 and shape[1] == llm.llm_input_size for shape in vllm.prompts)


# --- CosyVoice3 (the upstream library only: the PyPI copy has no CosyVoice3) ------------------------------------


def _has_cosyvoice3() -> bool:
    if MISSING:
        return False
    from cosyvoice.cli import cosyvoice as cli

    return hasattr(cli, "CosyVoice3")


needs_cosyvoice3 = pytest.mark.skipif(
    not _has_cosyvoice3(), reason="CosyVoice3 needs the upstream library (scripts/upstream-env.sh): the PyPI copy "
                                  "cosyvoice2-eu has only CosyVoice2")


@pytest.fixture(scope="module")
def engine3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tiny_cosyvoice import make_tiny_cosyvoice3, make_voice

    from cosy.workers.engines import load_engine

    root = tmp_path_factory.mktemp("cosyvoice3")
    make_voice(root / "voices", "tiny")
    eng = load_engine("cosyvoice", model_dir=str(make_tiny_cosyvoice3(root / "model")),
                      voices_dir=str(root / "voices"), cache_dir=str(root / "cache"), text_frontend="false",
                      capacity="2", llm_dtype="float64")
    assert eng.family == "CosyVoice3" and eng.scheduler == "cosy"
    yield eng
    eng.close()


@needs_cosyvoice3
def test_cosyvoice3_streams_the_library_tokens_through_the_pipeline(engine3: Any) -> None:
    with greedy(engine3):
        request, sink = _job(engine3, "Hi there", "tiny")
        chunks = sink.wait(120)
        inputs = engine3.model_inputs(request)[0]
        theirs = _library_tokens(engine3, inputs)
    (_, _, tokens, scheduled), = [p for p in engine3._pipeline.finished if p[0] == request.run]
    assert tokens == theirs and len(tokens) == 8 * 20
    assert scheduled[0] == 15 + 3
    assert sum(len(c) for c in chunks) == len(tokens) * SAMPLES_PER_TOKEN
    assert all(np.isfinite(c).all() for c in chunks)


# --- a job's own prompt (zero-shot and cross-lingual cloning) ----------------------------------------------


def _prompt_pcm(seconds: float = 1.5, pitch: float = 180.0) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * 32767 * np.sin(2 * np.pi * pitch * t)).astype("<i2").tobytes()


@pytest.mark.parametrize("scheduler", ["cosy", "library"])
def test_a_job_prompt_is_prepared_once_per_distinct_prompt(engine: Any, tiny: dict[str, Path],
                                                           scheduler: str) -> None:
    """Zero-shot from the job's own prompt (audio + transcript) and cross-lingual (audio alone): the features are
    computed once per distinct prompt and reused, on either scheduler."""
    from cosy.workers.engines import load_engine

    eng = engine if scheduler == "cosy" else load_engine(
        "cosyvoice", model_dir=str(tiny["model"]), voices_dir=str(tiny["voices"]), cache_dir=str(tiny["cache"]),
        text_frontend="false", scheduler="library")
    try:
        assert eng.clone
        before = eng.metrics()
        audio = _prompt_pcm(pitch=170.0 + len(scheduler))
        for prompt_text in ("The prompt's own words.", "The prompt's own words.", ""):
            request = SynthesisRequest("Ok", "tiny", run=f"p-{scheduler}-{len(prompt_text)}-{time.monotonic_ns()}",
                                       prompt_audio=audio, prompt_text=prompt_text)
            sink = CollectingSink()
            eng.start(request, sink)
            assert sum(len(c) for c in sink.wait(120)) == 2 * 20 * SAMPLES_PER_TOKEN
        after = eng.metrics()
        assert after["prompt_features_computed"] - before["prompt_features_computed"] == 2  # zero-shot, cross
        assert after["prompt_features_reused"] - before["prompt_features_reused"] == 1
    finally:
        if eng is not engine:
            eng.close()


def test_cross_lingual_inputs_carry_no_prompt_words(engine: Any) -> None:
    audio = _prompt_pcm(pitch=222.0)
    zero_shot = engine.model_inputs(SynthesisRequest("Ok", "tiny", prompt_audio=audio, prompt_text="Some words."))[0]
    cross = engine.model_inputs(SynthesisRequest("Ok", "tiny", prompt_audio=audio))[0]
    assert zero_shot["prompt_text"].shape[1] > 0 and zero_shot["llm_prompt_speech_token"].shape[1] > 0
    assert cross["prompt_text"].shape[1] == 0 and "llm_prompt_speech_token" not in cross
    assert cross["flow_prompt_speech_token"].shape[1] > 0  # the flow still hears the prompt's voice


def test_undecodable_prompt_audio_fails_the_job_clearly(engine: Any) -> None:
    sink = CollectingSink()
    engine.start(SynthesisRequest("Ok", "tiny", run=f"bad-{time.monotonic_ns()}", prompt_audio=b"\x00\x00" * 10,
                                  prompt_text="x"), sink)
    with pytest.raises(EngineError, match="prompt audio"):
        sink.wait(60)
    assert engine._pipeline.wait_idle(10)


def test_a_registered_voice_without_a_transcript_is_cross_lingual(engine: Any, tiny: dict[str, Path]) -> None:
    """An uploaded voice may come without its transcript: its jobs use the prompt's voice, not its words."""
    from tiny_cosyvoice import make_voice

    make_voice(tiny["voices"], "wordless", seconds=1.5, transcript="")
    inputs = engine.model_inputs(SynthesisRequest("Ok", "wordless"))[0]
    assert inputs["prompt_text"].shape[1] == 0 and "llm_prompt_speech_token" not in inputs
    _, sink = _job(engine, "Ok", "wordless")
    assert sum(len(c) for c in sink.wait(120)) == 2 * 20 * SAMPLES_PER_TOKEN
