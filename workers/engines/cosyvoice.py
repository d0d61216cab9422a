"""The GPU engine: the official CosyVoice library (CosyVoice2 / CosyVoice3, or a repackaged copy of it).

Options (``cosy worker --engine cosyvoice --option key=value``; every value may arrive as a string):

  model_dir        the model folder (cosyvoice2.yaml or cosyvoice3.yaml, llm.pt, flow.pt, hift.pt, ...)
  voices_dir       voice folders (``<name>/voice.json`` + reference audio), several joined with ``:``;
                   default: the voice registry's folders (user folder, then the shipped ``voices/``)
  cache_dir        where prompt features and TensorRT plans are kept ($XDG_CACHE_HOME/cosy by default)
  fp16, load_trt   auto (on when CUDA is there; TensorRT also needs the ``tensorrt`` package and the
                   model's flow.decoder.estimator.fp32.onnx), true or false
  load_vllm        false (default) or true, where the library supports it (CosyVoice2/3 upstream)
  load_jit         false (default) or true (CosyVoice2's flow.encoder.*.zip)
  scheduler        cosy (default for CosyVoice2/3): cosy's own pipeline, one batched LLM loop for every stream
                   (workers/engines/cosyvoice_pipeline.py); library: the library's own per-request
                   ``inference_zero_shot(stream=True)`` (CosyVoice v1 always uses it)
  backend          the cosy scheduler's LLM loop: torch (default) or vllm (where vLLM is installed, with
                   load_vllm: the library's vLLM export, stepped for every stream by one thread)
  capacity         jobs run at once: auto (default for scheduler=cosy: measured at warm-up, or taken from a
                   `cosy bench gpu` sweep in the cache folder) or a number (library scheduler: default 2)
  max_batch        the LLM loop's slots, the most streams decoded together (default 16)
  max_len          cache positions per stream: prompt + text + speech tokens (default 4096)
  first_hop        scheduler=cosy: tokens before the first chunk, plus the flow's look-ahead (default 15 + 3,
                   as the official Triton runtime); then 25, 50, 100 tokens per chunk as the library grows them
  llm_dtype        scheduler=cosy: auto (bfloat16 on CUDA where supported, else float16; float32 on a CPU),
                   float32, float16, bfloat16 or float64 (tests)
  cuda_graphs      scheduler=cosy: auto (on with CUDA), true or false
  vocoders         scheduler=cosy: threads running flow + HiFT (default 1), one stream's chunks strictly in order
  token_hop_len    scheduler=library: speech tokens in the first streamed chunk (the library's 25 = 1 s of audio:
                   it must match the flow's training chunk, so change it only with a model trained for it)
  text_frontend    true (default): the library's text normalisation; false sends the text as written
  device           a GPU index: sets CUDA_VISIBLE_DEVICES (only before torch is imported)

Traps in the library, and what this engine does about them (see docs/gpu.md):

* Importing it sets the root logger to DEBUG (``logging.basicConfig`` in cosyvoice/utils/file_utils.py)
  and reads an ``onnx_path`` environment variable at import (cosyvoice/utils/onnx.py; it then opens CUDA
  ONNX sessions): the import runs with ``onnx_path`` removed, and the logging setup is put back after.
* The device is hard-coded (``cuda`` when available): the GPU is chosen with CUDA_VISIBLE_DEVICES, by the
  worker's ``--device`` before torch is imported.
* ``CosyVoice2Model.tts`` grows the *shared* ``token_hop_len`` on every streamed chunk and never resets it,
  so concurrent and later requests get ever larger first chunks (4 s from the third request on).
  The engine makes ``token_hop_len`` per thread and resets it at the start of every job.
* ``speed`` is ignored with ``stream=True``: a job with speed != 1 is synthesised sentence by sentence
  without streaming, where the library applies speed itself (mel interpolation, pitch kept).
* CosyVoice3 needs ``<|endofprompt|>`` in the prompt text: added (after the model's default system prompt)
  when a voice's transcript lacks it.
* The zero-shot prompt is a wav *path* upstream since Dec 2025 and a 16 kHz *tensor* before (and in the
  PyPI copy ``cosyvoice2-eu``): the parameter name of ``add_zero_shot_spk`` says which.
* The TensorRT plan is written by the library non-atomically and never rebuilt when stale: the engine
  builds it itself (with the library's converter) under a file lock, into a temporary file renamed into
  place, named by GPU model, TensorRT version and precision, and hands that file to ``load_trt``.

The cache folder is best effort (:class:`CacheFolder`): a worker whose cache cannot be written (a full disk, a
quota, a read-only or unwritable folder) still serves. It logs one warning, the first time, and goes without:
prompt features are computed again at the next start, and without a TensorRT plan the flow decoder runs on torch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import io
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cosy import diskspace

from .base import EngineError, Sink, SynthesisRequest, VoiceInfo

log = logging.getLogger("cosy.engine.cosyvoice")

FAMILIES = {"cosyvoice3.yaml": "CosyVoice3", "cosyvoice2.yaml": "CosyVoice2", "cosyvoice.yaml": "CosyVoice"}
ENDOFPROMPT = "<|endofprompt|>"
COSYVOICE3_SYSTEM_PROMPT = "You are a helpful assistant."
TRT_ONNX = "flow.decoder.estimator.fp32.onnx"


# --- options ---------------------------------------------------------------------------


def _flag(value: bool | str | None, auto: bool) -> bool:
    """true/false/auto (as strings from the command line) to a bool; ``auto`` decides 'auto' and None."""
    if isinstance(value, bool):
        return value
    text = (value or "auto").strip().lower()
    if text == "auto":
        return auto
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise EngineError(f"expected true, false or auto, got {value!r}")


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cosy"


class CacheFolder:
    """The engine's cache folder: prompt features, TensorRT plans, the capacity a `cosy bench gpu` sweep stored.

    Best effort: an entry is written whole (a temporary file renamed into place) or not at all, and one that
    cannot be written costs only that entry. The first failure logs one warning; later ones are counted
    (the worker's metric ``cache_write_failures``) and logged at debug level, so a full disk is not a warning per
    job.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.failures = 0
        self._lock = threading.Lock()

    def write(self, path: Path, data: bytes) -> bool:
        """Store ``data`` at ``path`` (inside the folder); False, after :meth:`failed`, where it cannot."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            diskspace.write_atomic(path, data)
        except OSError as exc:
            self.failed(path, exc)
            return False
        return True

    def failed(self, path: Path, exc: OSError) -> None:
        with self._lock:
            self.failures += 1
            first = self.failures == 1
        reason = diskspace.describe(exc, path) if diskspace.is_no_space(exc) else (exc.strerror or str(exc))
        if first:
            log.warning("cannot write the cache %s (%s): serving without it; later cache writes that fail are "
                        "counted (cache_write_failures), not logged", path, reason)
        else:
            log.debug("cache write failed: %s (%s)", path, reason)


# --- voices (swap for cosy.voices.list_voices once the registry is packaged) -------------


@dataclass(frozen=True)
class RefVoice:
    name: str
    audio_path: Path
    transcript: str
    language: str = ""
    stamp: tuple[int, int] = (0, 0)  # the audio file's size and mtime when scanned: a replaced file is a new voice


def scan_voices(dirs: list[Path]) -> dict[str, RefVoice]:
    """``<dir>/<name>/voice.json`` ({"name", "transcript", "language", "audio"}); the first dir wins a name."""
    found: dict[str, RefVoice] = {}
    for base in dirs:
        if not base.is_dir():
            continue
        for meta in sorted(base.glob("*/voice.json")):
            try:
                data = json.loads(meta.read_text())
                audio = meta.parent / data.get("audio", "reference.wav")
                voice = RefVoice(str(data.get("name") or meta.parent.name), audio, str(data["transcript"]),
                                 str(data.get("language", "")))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping voice %s: %s", meta.parent, exc)
                continue
            try:
                st = voice.audio_path.stat()
            except OSError:
                continue
            if voice.audio_path.is_file():
                found.setdefault(voice.name, dataclasses.replace(voice, stamp=(st.st_size, st.st_mtime_ns)))
    return found


def default_voice_dirs() -> list[Path]:
    try:
        from cosy.voices import voice_dirs  # the registry, where installed
    except ImportError:
        return [Path(__file__).resolve().parents[2] / "voices"]
    return list(voice_dirs())


# --- TensorRT plan: locked, atomic, keyed ---------------------------------------------------


def ensure_trt_plan(folder: Path, key: str, build: Callable[[Path], None]) -> Path:
    """The plan ``folder/<key>.plan``, built once by ``build(tmp_path)`` under a file lock and renamed into place.

    Several workers starting together build it once; a crash mid-build leaves no half-written plan; a new
    GPU model or TensorRT version has a new key, so a stale plan is never loaded.
    """
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / f"{key}.plan"
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if plan.is_file() and plan.stat().st_size > 0:
                return plan
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
            os.close(fd)
            try:
                log.warning("building the TensorRT plan %s: this takes minutes, once per GPU model", plan.name)
                t0 = time.monotonic()
                build(Path(tmp))
                if os.path.getsize(tmp) == 0:
                    raise EngineError("the TensorRT build wrote an empty plan")
                os.replace(tmp, plan)
                log.warning("TensorRT plan built in %.0f s: %s", time.monotonic() - t0, plan)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return plan


def trt_plan_key(gpu_name: str, trt_version: str, fp16: bool, onnx_file: Path) -> str:
    stat = onnx_file.stat()
    digest = hashlib.sha256(f"{onnx_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-") or "gpu"
    return f"flow.decoder.estimator.{'fp16' if fp16 else 'fp32'}.{gpu}.trt{trt_version}.{digest}"


# --- the hop-length trap ---------------------------------------------------------------------


class PerThreadHop:
    """A data descriptor that gives every thread its own ``token_hop_len``, starting from ``initial``.

    Installed on a per-instance subclass of the library's model, it takes precedence over the instance
    attribute the library assigns, so one request's growth of the hop never reaches another request.
    """

    def __init__(self, initial: int) -> None:
        self.initial = initial
        self._local = threading.local()

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(self._local, "value", self.initial)

    def __set__(self, obj: object, value: int) -> None:
        self._local.value = value

    def reset(self) -> None:
        self._local.value = self.initial


def isolate_hop_len(model: Any, initial: int | None = None) -> PerThreadHop | None:
    """Make ``model.token_hop_len`` per thread (CosyVoice2/3 models); None for models without one."""
    if "token_hop_len" not in getattr(model, "__dict__", {}):
        return None
    hop = PerThreadHop(int(initial if initial is not None else vars(model)["token_hop_len"]))
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"token_hop_len": hop, "__module__": cls.__module__})
    del model.__dict__["token_hop_len"]
    return hop


class CopyOnRead(dict):
    """The library's speaker cache (``frontend.spk2info``), handing out shallow copies.

    ``frontend_zero_shot`` takes the cached entry itself and writes the request's ``text`` into
    it before ``model.tts(**entry)`` runs: two concurrent jobs on one voice could each speak the
    other's text. A copy per read keeps the cache unchanged and each job's text its own.
    """

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        return dict(value) if isinstance(value, dict) else value


def isolate_speaker_cache(frontend: Any) -> None:
    if isinstance(getattr(frontend, "spk2info", None), dict) and not isinstance(frontend.spk2info, CopyOnRead):
        frontend.spk2info = CopyOnRead(frontend.spk2info)


# --- CUDA out of memory ----------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, oom_type) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the engine ------------------------------------------------------------------------------


MAX_PROMPT_SPEAKERS = 64  # per-request prompts whose features stay cached (least recently used go first)


class CosyVoiceEngine:
    name = "cosyvoice"
    clone = True  # zero-shot and cross-lingual from a job's own prompt audio (SynthesisRequest.prompt_audio)
    instruct = True  # SynthesisRequest.instruct: the library's instruct mode (CosyVoice2/3)

    def __init__(self, model_dir: str, voices_dir: str | None = None, cache_dir: str | None = None,
                 fp16: bool | str = "auto", load_trt: bool | str = "auto", load_vllm: bool | str = "false",
                 load_jit: bool | str = "false", capacity: int | str | None = None,
                 token_hop_len: int | str | None = None, text_frontend: bool | str = "true",
                 trt_concurrent: int | str | None = None, device: str | None = None,
                 default_voice: str | None = None, scheduler: str = "cosy", backend: str = "torch",
                 max_batch: int | str = 16, max_len: int | str = 4096, first_hop: int | str = 15,
                 llm_dtype: str = "auto", cuda_graphs: bool | str = "auto", vocoders: int | str = 1) -> None:
        self.model_dir = Path(model_dir).expanduser().resolve()
        self.family = self._family(self.model_dir)
        self.scheduler = self._scheduler(scheduler)
        self._capacity_option = None if capacity in (None, "", "auto") else int(capacity)
        self.capacity = self._capacity_option or (2 if self.scheduler == "library" else 1)
        self.capacity_source = "option" if self._capacity_option else "default"
        self._text_frontend = _flag(text_frontend, True)
        self._voice_dirs = [Path(p) for p in voices_dir.split(os.pathsep)] if voices_dir else default_voice_dirs()
        self._cache = _cache_root(cache_dir)
        self._cache_folder = CacheFolder(self._cache)
        # Two locks, so that the worker's socket loop (voices(), refresh_voices()) never waits on a voice whose
        # prompt features are being computed: _voices_lock guards the folder scan's result, _prepare_lock the
        # feature computation.
        self._voices_lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._counts = {"voice_prompts_computed": 0, "voice_prompts_loaded": 0, "prompt_features_computed": 0,
                        "prompt_features_reused": 0}
        self._prompt_speakers: collections.OrderedDict[str, None] = collections.OrderedDict()
        if device is not None:
            self._select_device(str(device))

        cli, torch = self._import_library()
        self._torch = torch
        cuda = bool(torch.cuda.is_available())
        self.device = f"cuda:{os.environ.get('CUDA_VISIBLE_DEVICES', '0').split(',')[0]}" if cuda else "cpu"
        from cosy.gpu import GpuMonitor

        self._gpu = GpuMonitor() if cuda else None
        fp16_on = _flag(fp16, cuda) and cuda
        trt_on = _flag(load_trt, cuda and self._trt_ready()) and cuda
        vllm_on = _flag(load_vllm, False) and cuda
        self._tts = self._construct(cli, fp16_on, vllm_on, _flag(load_jit, False) and cuda)
        if trt_on:
            trt_on = self._load_trt(fp16_on, int(trt_concurrent or max(self.capacity, 2)))
        self.sample_rate = int(self._tts.sample_rate)
        self._hop = isolate_hop_len(self._tts.model, int(token_hop_len) if token_hop_len is not None else None)
        isolate_speaker_cache(self._tts.frontend)
        self._prompt_kind = self._prompt_signature()
        self._model_key_value = self._model_key()  # once: the model folder does not change under a running worker

        self._voices: dict[str, RefVoice] = {}
        self._ready: dict[str, tuple[RefVoice, str]] = {}  # voice name -> (the voice as prepared, speaker id)
        self._rescan()
        for voice in list(self._voices.values()):
            self._prepare(voice)
        if not self._voices:
            raise EngineError(f"no voices in {', '.join(map(str, self._voice_dirs))}: add one with `cosy voices add`")
        self._default = default_voice if default_voice in self._voices else (
            "joe" if "joe" in self._voices else next(iter(self._voices)))

        self._pipeline = None
        self._library_runner = None
        if self.scheduler == "cosy":
            from .cosyvoice_setup import build_pipeline

            self._pipeline, self._pipeline_info = build_pipeline(
                self, backend=backend, vllm=vllm_on, max_batch=int(max_batch), max_len=int(max_len),
                first_hop=int(first_hop), llm_dtype=llm_dtype, cuda_graphs=_flag(cuda_graphs, cuda) and cuda,
                vocoders=int(vocoders))
        else:
            from .base import ThreadedEngine

            self._library_runner = ThreadedEngine(_LibrarySynth(self))
        self.model = (f"{self.family} ({self.model_dir.name}){' fp16' if fp16_on else ''}{' trt' if trt_on else ''}"
                      f"{'' if self.scheduler == 'cosy' else ' library scheduler'}")

    def _scheduler(self, scheduler: str) -> str:
        scheduler = (scheduler or "cosy").strip().lower()
        if scheduler not in ("cosy", "library"):
            raise EngineError(f"scheduler must be cosy or library, not {scheduler!r}")
        if scheduler == "cosy" and self.family == "CosyVoice":
            log.info("CosyVoice (v1) runs on the library's scheduler")
            return "library"
        return scheduler

    # --- loading ---------------------------------------------------------------------------

    @staticmethod
    def _family(model_dir: Path) -> str:
        for config, family in FAMILIES.items():
            if (model_dir / config).is_file():
                return family
        raise EngineError(f"{model_dir} is not a CosyVoice model folder (no {' / '.join(FAMILIES)})")

    @staticmethod
    def _select_device(device: str) -> None:
        import sys

        if "torch" in sys.modules and os.environ.get("CUDA_VISIBLE_DEVICES") != device:
            raise EngineError("device must be chosen before torch is imported: use `cosy worker --device N`")
        os.environ["CUDA_VISIBLE_DEVICES"] = device

    @staticmethod
    def _import_library() -> tuple[Any, Any]:
        """Import torch and the library with its import-time side effects undone."""
        root = logging.getLogger()
        level, handlers = root.level, list(root.handlers)
        saved = {k: os.environ.pop(k) for k in ("onnx_path", "COSYV2_IGNORE_BLANKEN") if k in os.environ}
        os.environ.setdefault("TQDM_DISABLE", "1")  # the library wraps every job in a progress bar
        try:
            import torch
            from cosyvoice.cli import cosyvoice as cli
        except ImportError as exc:
            raise EngineError(f"the cosyvoice engine needs torch and the CosyVoice library ({exc}): "
                              "see docs/gpu.md (`pixi run -e gpu ...`)") from exc
        finally:
            os.environ.update(saved)
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
        if saved.get("onnx_path"):
            log.warning("ignored onnx_path=%s (a training setting of the CosyVoice library)", saved["onnx_path"])
        return cli, torch

    def _construct(self, cli: Any, fp16: bool, vllm: bool, jit: bool) -> Any:
        """The family's class with the options its signature takes (TensorRT is loaded separately)."""
        cls = getattr(cli, self.family, None)
        if cls is None:
            raise EngineError(f"the installed CosyVoice library has no {self.family} (model {self.model_dir})")
        params = inspect.signature(cls.__init__).parameters
        wanted: dict[str, Any] = {"fp16": fp16, "load_jit": jit, "load_vllm": vllm, "load_trt": False}
        if "final" in params:  # the cosyvoice2-eu fork: load llm.pt/flow.pt/hift.pt, not llm-original.pt...
            wanted["final"] = True
        kwargs = {k: v for k, v in wanted.items() if k in params}
        if vllm and "load_vllm" not in params:
            log.warning("this CosyVoice library has no vLLM support for %s: running without", self.family)
        t0 = time.monotonic()
        try:
            tts = cls(str(self.model_dir), **kwargs)
        except (OSError, ValueError, AssertionError, TypeError, KeyError) as exc:
            raise EngineError(f"cannot load {self.model_dir}: {exc.__class__.__name__}: {exc}") from exc
        log.info("loaded %s from %s in %.1f s (%s)", self.family, self.model_dir, time.monotonic() - t0, kwargs)
        return tts

    @staticmethod
    def _trt_ready() -> bool:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return False
        return True

    def _load_trt(self, fp16: bool, concurrent: int) -> bool:
        """Build (once, into the cache) and load the flow decoder's TensorRT plan; False where it runs on torch."""
        onnx_file = self.model_dir / TRT_ONNX
        if not onnx_file.is_file():
            log.warning("no %s in the model folder: running the flow decoder without TensorRT", TRT_ONNX)
            return False
        import tensorrt as trt
        from cosyvoice.utils.file_utils import convert_onnx_to_trt

        model = self._tts.model
        gpu = self._torch.cuda.get_device_name(0)
        key = trt_plan_key(gpu, trt.__version__, fp16, onnx_file)
        folder = self._cache / "trt"
        try:
            plan = ensure_trt_plan(folder, key, lambda tmp: convert_onnx_to_trt(str(tmp), model.get_trt_kwargs(),
                                                                                str(onnx_file), fp16))
        except OSError as exc:  # the library loads a plan from a file only: no file, no TensorRT
            self._cache_folder.failed(folder / f"{key}.plan", exc)
            log.warning("no TensorRT plan could be stored: running the flow decoder without TensorRT")
            return False
        model.load_trt(str(plan), str(onnx_file), concurrent, fp16)
        return True

    def _prompt_signature(self) -> str:
        params = list(inspect.signature(self._tts.add_zero_shot_spk).parameters)
        if "prompt_wav" in params:
            return "path"
        if "prompt_speech_16k" in params:
            return "tensor"
        raise EngineError(f"unknown add_zero_shot_spk signature {params}: unsupported CosyVoice library version")

    # --- voices ----------------------------------------------------------------------------

    def _rescan(self) -> None:
        found = scan_voices(self._voice_dirs)
        with self._voices_lock:
            self._voices = found

    def _prompt_text(self, voice: RefVoice) -> str:
        if self.family == "CosyVoice3" and ENDOFPROMPT not in voice.transcript:
            return f"{COSYVOICE3_SYSTEM_PROMPT}{ENDOFPROMPT}{voice.transcript}"
        return voice.transcript

    def _model_key(self) -> str:
        parts = [str(self.model_dir)]
        for name in sorted(self.model_dir.glob("*.onnx")) + sorted(self.model_dir.glob("*.yaml")):
            stat = name.stat()
            parts.append(f"{name.name}:{stat.st_size}:{stat.st_mtime_ns}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _feature_file(self, voice: RefVoice) -> tuple[Path, str]:
        digest = hashlib.sha256()
        digest.update(voice.audio_path.read_bytes())
        digest.update(self._prompt_text(voice).encode())
        digest.update(self._prompt_kind.encode())
        spk_id = f"cosy-{voice.name}-{digest.hexdigest()[:12]}"
        return self._cache / "prompts" / self._model_key_value / f"{spk_id}.pt", spk_id

    def _prepare(self, voice: RefVoice) -> str:
        """The voice's speaker id, its prompt features computed once and kept in ``cache_dir`` across restarts.
        A voice prepared before, unchanged since (same folder entry, same file size and mtime), costs a dict
        lookup: nothing is read or hashed per job."""
        ready = self._ready.get(voice.name)
        if ready is not None and ready[0] == voice:
            return ready[1]
        with self._prepare_lock:
            ready = self._ready.get(voice.name)
            if ready is not None and ready[0] == voice:
                return ready[1]
            path, spk_id = self._feature_file(voice)
            spk2info = self._tts.frontend.spk2info
            if spk_id not in spk2info:
                if path.is_file():
                    spk2info[spk_id] = self._torch.load(path, map_location=self._tts.frontend.device,
                                                        weights_only=True)
                    self._counts["voice_prompts_loaded"] += 1
                    log.info("voice %s: prompt features from %s", voice.name, path)
                else:
                    self._tts.add_zero_shot_spk(self._prompt_text(voice), self._prompt_audio(voice), spk_id)
                    self._counts["voice_prompts_computed"] += 1
                    saved = self._save_features(path, spk2info[spk_id])
                    log.info("voice %s: prompt features computed%s", voice.name,
                             f" and saved to {path}" if saved else " (not cached)")
            self._ready[voice.name] = (voice, spk_id)
        return spk_id

    def _save_features(self, path: Path, features: dict[str, Any]) -> bool:
        """Keep a voice's prompt features for the next start; False where the cache cannot be written."""
        buf = io.BytesIO()  # serialised in memory: torch reports a full disk as a RuntimeError without its errno
        self._torch.save({k: v.cpu() for k, v in features.items()}, buf)
        return self._cache_folder.write(path, buf.getvalue())

    def _prompt_audio(self, voice: RefVoice) -> Any:
        if self._prompt_kind == "path":
            return str(voice.audio_path)
        import soundfile as sf
        import torchaudio

        audio, rate = sf.read(str(voice.audio_path), dtype="float32", always_2d=True)
        speech = self._torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1)))[None]
        return torchaudio.functional.resample(speech, rate, 16000) if rate != 16000 else speech

    def _speaker(self, name: str) -> str:
        name = self._default if name in ("", "default") else name
        voice = self._voices.get(name)
        if voice is None:  # added to the folder since the last scan?
            self._rescan()
            voice = self._voices.get(name)
        if voice is None:
            raise EngineError(f"voice {name!r} is not available here (voices: {', '.join(sorted(self._voices))})")
        try:
            return self._prepare(voice)
        except OSError as exc:
            raise EngineError(f"voice {name!r}: cannot read its reference audio: {exc}") from exc

    def _prompt_speaker(self, audio: bytes, text: str) -> str:
        """A speaker id for a job's own prompt (16 kHz s16le PCM, its transcript or none for cross-lingual): the
        features are computed once per distinct prompt, cached by content, the last MAX_PROMPT_SPEAKERS kept."""
        digest = hashlib.sha256(audio + b"\0" + text.encode() + self._prompt_kind.encode()).hexdigest()[:16]
        spk_id = f"prompt-{digest}"
        with self._prepare_lock:
            spk2info = self._tts.frontend.spk2info
            if spk_id in self._prompt_speakers and spk_id in spk2info:
                self._prompt_speakers.move_to_end(spk_id)
                self._counts["prompt_features_reused"] += 1
                return spk_id
            pcm = np.frombuffer(audio, dtype="<i2").astype(np.float32) / 32768.0
            transcript = self._prompt_text(RefVoice("prompt", Path(), text)) if text else (
                f"{COSYVOICE3_SYSTEM_PROMPT}{ENDOFPROMPT}" if self.family == "CosyVoice3" else "")
            tmp = self._prompt_file(pcm) if self._prompt_kind == "path" else None
            try:
                if tmp is not None:
                    self._tts.add_zero_shot_spk(transcript, str(tmp), spk_id)
                else:
                    self._tts.add_zero_shot_spk(transcript, self._torch.from_numpy(pcm)[None], spk_id)
            except (ValueError, RuntimeError, AssertionError) as exc:
                raise EngineError(f"cannot use the job's prompt audio: {exc.__class__.__name__}: {exc}") from exc
            finally:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
            self._counts["prompt_features_computed"] += 1
            self._prompt_speakers[spk_id] = None
            while len(self._prompt_speakers) > MAX_PROMPT_SPEAKERS:
                old, _ = self._prompt_speakers.popitem(last=False)
                spk2info.pop(old, None)
        return spk_id

    @staticmethod
    def _prompt_file(pcm: np.ndarray) -> Path:
        """A job's prompt as a temporary 16 kHz WAV file, for a library that takes the prompt as a path."""
        import soundfile as sf

        wav = io.BytesIO()  # encoded in memory: libsndfile reports a full disk without its errno
        sf.write(wav, pcm, 16000, format="WAV", subtype="PCM_16")
        tmp = Path(tempfile.gettempdir()) / f"cosy-prompt-{uuid.uuid4().hex}.wav"
        try:
            diskspace.write_file(tmp, wav.getvalue(), mode=0o600)  # a user's recording: theirs to read
        except OSError as exc:  # this job fails; another worker may have room
            reason = diskspace.describe(exc, tmp) if diskspace.is_no_space(exc) else exc.strerror or str(exc)
            raise EngineError(f"cannot write the job's prompt audio to {tmp.parent}: {reason}",
                              retryable=True) from exc
        return tmp

    def _request_speaker(self, request: SynthesisRequest) -> str:
        if request.prompt_audio:
            return self._prompt_speaker(request.prompt_audio, request.prompt_text)
        return self._speaker(request.voice)

    def _cross_lingual(self, request: SynthesisRequest) -> bool:
        """The prompt's voice without its words: a job's own prompt without a transcript, or a registered voice
        stored without one (an upload may leave it out)."""
        if request.prompt_audio:
            return not request.prompt_text
        name = self._default if request.voice in ("", "default") else request.voice
        voice = self._voices.get(name)
        return voice is not None and not voice.transcript.strip()

    def refresh_voices(self) -> bool:
        """Look at the voice folders again (`cosy voices add` on a running system); True if the set changed.
        Reads only the folders' voice.json files: never waits on a voice being prepared."""
        before = set(self._voices)
        self._rescan()
        return set(self._voices) != before

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(v.name, language=v.language, description=f"zero-shot ({self.family})")
                for v in sorted(self._voices.values(), key=lambda v: v.name)]

    @property
    def default_voice(self) -> str:
        return self._default

    # --- synthesis -------------------------------------------------------------------------

    def start(self, request: SynthesisRequest, sink: Sink) -> None:
        if self._pipeline is not None:
            self._pipeline.submit(request, sink)
        else:
            self._library_runner.start(request, sink)

    def cancel(self, run: str) -> None:
        if self._pipeline is not None:
            self._pipeline.cancel(run)
        else:
            self._library_runner.cancel(run)

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """The job's chunks as a blocking generator (tests, benchmarks), whichever the scheduler."""
        from .base import QueueSink

        run = request.run or f"sync-{uuid.uuid4().hex}"
        request = dataclasses.replace(request, run=run)
        sink = QueueSink()
        self.start(request, sink)
        try:
            yield from sink
        finally:
            if not sink.finished:
                self.cancel(run)

    def warm_up(self) -> None:
        """Before READY: one job through the engine; with the cosy scheduler also the CUDA graphs and the
        measured capacity (see cosyvoice_setup.warm_up)."""
        if self._pipeline is not None:
            from .cosyvoice_setup import warm_up

            warm_up(self)
        else:
            for _ in self.synthesize(SynthesisRequest("Hello.", self._default)):
                pass

    def _instruct_text(self, instruct: str) -> str:
        if self.family == "CosyVoice3" and ENDOFPROMPT not in instruct:
            return f"{COSYVOICE3_SYSTEM_PROMPT} {instruct}{ENDOFPROMPT}"
        return instruct

    def model_inputs(self, request: SynthesisRequest) -> list[dict[str, Any]]:
        """The library frontend's model inputs for each piece of the text (scheduler=cosy; on its frontend
        thread). Instruct mode puts the instruct text where the library's ``inference_instruct2`` means it to be:
        as the LLM's prompt text, without the voice's prompt speech tokens (with a cached speaker the library's
        ``frontend_instruct2`` keeps the transcript instead)."""
        spk_id = self._request_speaker(request)
        cross_lingual = self._cross_lingual(request)
        frontend = self._tts.frontend
        empty_prompt = "" if self._prompt_kind == "path" else self._torch.zeros(1, 0)
        instruct = getattr(request, "instruct", "") or ""
        out = []
        for piece in frontend.text_normalize(request.text, split=True, text_frontend=self._text_frontend):
            inputs = frontend.frontend_zero_shot(piece, "", empty_prompt, self.sample_rate, spk_id)
            if cross_lingual:  # the prompt's voice, not its words: as the library's frontend_cross_lingual
                inputs.pop("llm_prompt_speech_token", None)
                inputs.pop("llm_prompt_speech_token_len", None)
            if instruct:
                text = self._instruct_text(instruct)
                if ENDOFPROMPT not in text:
                    text += ENDOFPROMPT
                inputs["prompt_text"], inputs["prompt_text_len"] = frontend._extract_text_token(text)
                inputs.pop("llm_prompt_speech_token", None)
                inputs.pop("llm_prompt_speech_token_len", None)
            if inputs["text"].shape[1]:
                out.append(inputs)
        return out

    def _library_synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """scheduler=library: the library's own per-request streaming."""
        spk_id = self._request_speaker(request)
        stream = abs(request.speed - 1.0) < 1e-3  # the library ignores speed when streaming
        empty_prompt = "" if self._prompt_kind == "path" else self._torch.zeros(1, 0)
        instruct = getattr(request, "instruct", "") or ""
        options = {"stream": stream, "speed": request.speed, "text_frontend": self._text_frontend}
        if self._hop is not None:
            self._hop.reset()
        if instruct and hasattr(self._tts, "inference_instruct2"):  # an instruction wins over the prompt's words
            outputs = self._tts.inference_instruct2(request.text, self._instruct_text(instruct), empty_prompt,
                                                    zero_shot_spk_id=spk_id, **options)
        elif self._cross_lingual(request) and hasattr(self._tts, "inference_cross_lingual"):
            outputs = self._tts.inference_cross_lingual(request.text, empty_prompt, zero_shot_spk_id=spk_id,
                                                        **options)
        else:
            outputs = self._tts.inference_zero_shot(request.text, "", empty_prompt, zero_shot_spk_id=spk_id,
                                                    **options)
        try:
            yield from self._chunks(outputs, request)
        finally:
            outputs.close()

    def _chunks(self, outputs: Iterator[dict[str, Any]], request: SynthesisRequest) -> Iterator[np.ndarray]:
        try:
            for output in outputs:
                if request.cancelled.is_set():
                    return
                # [1, N] float32 on the CPU: a view, no copy (the worker converts it to s16 once).
                yield output["tts_speech"].reshape(-1).numpy()
        except Exception as exc:
            if is_oom(exc):
                free_cuda_cache()
                raise EngineError(f"CUDA out of memory: {exc}", retryable=True) from exc
            raise

    # --- reporting -------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counts)
        out["scheduler"] = self.scheduler
        out["capacity_source"] = self.capacity_source
        out["cache_write_failures"] = self._cache_folder.failures
        if self._pipeline is not None:
            out.update(self._pipeline.stats())
        if self._gpu is not None:
            out.update(self._gpu.metrics())
        return out

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.close()
        if self._library_runner is not None:
            self._library_runner._pool.shutdown(wait=False, cancel_futures=True)
        if self._gpu is not None:
            self._gpu.close()


class _LibrarySynth:
    """scheduler=library as a generator engine, for ThreadedEngine: one library request per thread."""

    def __init__(self, engine: CosyVoiceEngine) -> None:
        self.engine = engine
        self.capacity = engine.capacity

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        return self.engine._library_synthesize(request)

    def close(self) -> None:
        pass
