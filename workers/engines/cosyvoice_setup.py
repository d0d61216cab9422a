"""Building cosy's pipeline over a loaded CosyVoice2/3 model, warming it up and measuring its capacity.

The pieces come from the library: the LLM's weights and sampling rules (``model.llm``), the flow and HiFT through
its own ``token2wav`` (with its caches and fades), the chunk sizes (``token_hop_len``, ``stream_scale_factor``,
``token_max_hop_len``, the flow's ``pre_lookahead_len``) and CosyVoice3's silent tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import EngineError, SynthesisRequest
from .cosyvoice_pipeline import TOKENS_PER_S, Piece, Pipeline, Schedule

if TYPE_CHECKING:
    from .cosyvoice import CosyVoiceEngine

log = logging.getLogger("cosy.engine.pipeline")

TARGET_RTF = 0.5  # capacity: the largest batch at which every stream still runs at least twice real time
MIN_TOKEN_TEXT_RATIO = 2  # the library's defaults in Qwen2LM.inference
MAX_TOKEN_TEXT_RATIO = 20
WARM_TEXT = "Hello there."  # a few chunks: every stage warm; short, as a worker start waits on it


def resolve_dtype(name: str, cuda: bool) -> Any:
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if not cuda:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}
    if name not in table:
        raise EngineError(f"llm_dtype must be auto, {', '.join(sorted(table))}; not {name!r}")
    return table[name]


def token_limits(inputs: dict[str, Any]) -> tuple[int, int]:
    """The library's min and max speech tokens for a piece: 2x and 20x its text tokens."""
    n = int(inputs["text"].shape[1])
    return n * MIN_TOKEN_TEXT_RATIO, n * MAX_TOKEN_TEXT_RATIO


class LibraryVocoder:
    """Tokens to audio with the library's ``token2wav`` (flow + HiFT, its mel/source caches and fades), each
    piece under its own key in the library's ``hift_cache_dict``; on CUDA on a stream of its own."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model = model
        self.torch = torch
        self.cuda_stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.seconds = 0.0  # time spent, and audio made: the capacity estimate's vocoder cost
        self.samples = 0

    def start_piece(self, piece: Piece) -> None:
        with self.model.lock:
            self.model.hift_cache_dict[piece.uuid] = None

    def chunk(self, piece: Piece, end: int, offset: int, finalize: bool, speed: float) -> np.ndarray:
        torch = self.torch
        inputs = piece.inputs
        t0 = time.perf_counter()
        token = torch.tensor([piece.tokens[:end]], dtype=torch.int32)
        ctx = torch.cuda.stream(self.cuda_stream) if self.cuda_stream is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            speech = self.model.token2wav(token=token, prompt_token=inputs["flow_prompt_speech_token"],
                                          prompt_feat=inputs["prompt_speech_feat"], embedding=inputs["flow_embedding"],
                                          token_offset=offset, uuid=piece.uuid, stream=not finalize,
                                          finalize=finalize, speed=speed)
            audio = speech.reshape(-1).float().cpu().numpy()
        self.seconds += time.perf_counter() - t0
        self.samples += audio.size
        return audio

    def end_piece(self, piece: Piece) -> None:
        with self.model.lock:
            self.model.hift_cache_dict.pop(piece.uuid, None)


def build_pipeline(engine: CosyVoiceEngine, backend: str, vllm: bool, max_batch: int, max_len: int, first_hop: int,
                   llm_dtype: str, cuda_graphs: bool, vocoders: int) -> tuple[Pipeline, dict[str, Any]]:
    import torch

    from .batched_lm import TorchBackend
    from .sampling import SamplingRules

    model = engine._tts.model
    llm = model.llm
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backend = (backend or "torch").strip().lower()
    if backend not in ("torch", "vllm"):
        raise EngineError(f"backend must be torch or vllm, not {backend!r}")
    if backend == "vllm" or hasattr(llm, "vllm"):
        if not hasattr(llm, "vllm"):
            raise EngineError("backend=vllm needs load_vllm=true, CUDA and the vllm package")
        from .vllm_loop import VllmBackend

        lm_backend: Any = VllmBackend(llm.vllm, llm, slots=max_batch, rules=SamplingRules.from_library(llm))
        backend, dtype = "vllm", torch.bfloat16
    else:
        dtype = resolve_dtype(llm_dtype, cuda)
        rules = SamplingRules.from_library(llm)
        lm_backend = TorchBackend(llm, slots=max_batch, max_len=max_len, rules=rules, dtype=dtype, device=device)
        llm.to(device=device, dtype=dtype)  # after the backend read the rotary frequencies in float32
    # The library's hop growth: 25 -> 50, 100 (upstream's token_hop_len, stream_scale_factor, token_max_hop_len;
    # the same defaults where an older copy, like the PyPI fork, has no growth: fewer flow passes per job).
    hop = engine._hop.initial if engine._hop is not None else 25
    schedule = Schedule(first_hop=first_hop, hop=hop, max_hop=int(getattr(model, "token_max_hop_len", 4 * hop)),
                        scale=int(getattr(model, "stream_scale_factor", 2)),
                        lookahead=int(model.flow.pre_lookahead_len))
    vocoder = LibraryVocoder(model)
    pipeline = Pipeline(lm_backend, vocoder, engine.model_inputs, schedule, token_limits,
                        silent_tokens=frozenset(int(t) for t in getattr(model, "silent_tokens", [])),
                        vocoders=vocoders)
    info = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "cuda_graphs": cuda_graphs and cuda,
            "slots": max_batch, "max_len": max_len, "schedule": schedule}
    log.info("cosy pipeline: %s backend, %s, %d slots x %d positions, first chunk after %d + %d tokens", backend,
             info["dtype"], max_batch, max_len, first_hop, schedule.lookahead)
    return pipeline, info


def buckets(max_batch: int) -> list[int]:
    """Batch sizes measured (and graphed): 1, 2, 4, ... up to max_batch (included)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return out


def measure_steps(backend: Any, sizes: list[int], positions: int = 256, repeats: int = 4) -> dict[int, float]:
    """Seconds per decode step at each batch size, over ``positions`` cached positions (the pipeline idle)."""
    out: dict[int, float] = {}
    positions = min(positions, backend.lm.max_len - repeats - 2)
    for b in sizes:
        for s in range(b):
            backend.lengths[s] = positions
        backend.inputs.pos[:b] = positions - 1
        backend.inputs.steps[:b] = 1
        backend.step(b)  # warm
        t0 = time.perf_counter()
        for _ in range(repeats):
            backend.step(b)
        out[b] = (time.perf_counter() - t0) / repeats
        backend.reset()
    return out


def capacity_file(engine: CosyVoiceEngine) -> Path:
    import torch

    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    tag = "".join(c if c.isalnum() else "-" for c in where).strip("-")
    return engine._cache / "capacity" / f"{engine._model_key_value}-{tag}.json"


def save_capacity(engine: CosyVoiceEngine, capacity: int, rtf_by_streams: dict[int, float],
                  source: str) -> Path | None:
    """Store a capacity measured by ``cosy bench gpu`` for this model on this GPU (read at the next start).
    None where the cache folder cannot be written (the engine's one warning says why): the next start measures."""
    path = capacity_file(engine)
    data = json.dumps({"capacity": capacity, "rtf": {str(k): v for k, v in rtf_by_streams.items()},
                       "source": source, "date": time.strftime("%Y-%m-%d %H:%M:%S %z")})
    return path if engine._cache_folder.write(path, data.encode()) else None


def _stored_capacity(engine: CosyVoiceEngine) -> int | None:
    path = capacity_file(engine)
    try:
        data = json.loads(path.read_text())
        return max(1, int(data["capacity"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def warm_up(engine: CosyVoiceEngine) -> None:
    """One job through every stage, CUDA graphs for every bucket, then the capacity: the announced number of
    jobs is the largest batch whose estimated real-time factor (LLM step x 25 tokens/s + the vocoder's share)
    stays at or under TARGET_RTF, unless ``capacity`` was given or a `cosy bench gpu` sweep stored one."""
    pipeline = engine._pipeline
    info = engine._pipeline_info
    t0 = time.perf_counter()
    for _ in engine.synthesize(SynthesisRequest(WARM_TEXT, engine.default_voice, run="warm-up", seed=0)):
        pass
    warm_s = time.perf_counter() - t0
    backend = pipeline.backend
    sizes = buckets(pipeline.max_batch)
    if info["cuda_graphs"] and hasattr(backend, "capture_graphs"):
        t1 = time.perf_counter()
        graphed = backend.capture_graphs(sizes)
        log.info("CUDA graphs for batch sizes %s in %.1f s", graphed or "none", time.perf_counter() - t1)
        info["graphed"] = graphed
    vocoder = pipeline.vocoder
    voc_cost = vocoder.seconds / (vocoder.samples / engine.sample_rate) if vocoder.samples else 0.0
    if engine._capacity_option:
        engine.capacity, engine.capacity_source = min(engine._capacity_option, pipeline.max_batch), "option"
    elif (stored := _stored_capacity(engine)) is not None:
        engine.capacity, engine.capacity_source = min(stored, pipeline.max_batch), "bench"
    elif hasattr(backend, "lm"):
        steps = measure_steps(backend, sizes)
        rtf = {b: s * TOKENS_PER_S + b * voc_cost / max(1, len(pipeline.threads) - 2) for b, s in steps.items()}
        fits = [b for b, r in rtf.items() if r <= TARGET_RTF]
        engine.capacity = max(fits) if fits else 1
        engine.capacity_source = "warm-up"
        info["rtf_estimate"] = {b: round(r, 4) for b, r in rtf.items()}
        if not fits:
            log.warning("even one stream is estimated at RTF %.2f (> %.2f): capacity 1", rtf[1], TARGET_RTF)
    else:
        engine.capacity, engine.capacity_source = pipeline.max_batch, "default"
    log.info("cosy pipeline warm in %.1f s (first job %.2f s); capacity %d (%s)", time.perf_counter() - t0, warm_s,
             engine.capacity, engine.capacity_source)
