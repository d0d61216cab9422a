"""Speech engines. Each is imported only when a worker asks for it by name."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Engine, EngineError, Sink, SynthesisRequest, VoiceInfo, as_engine

ENGINES: dict[str, str] = {
    "piper": "cosy.workers.engines.piper:PiperEngine",
    "cosyvoice": "cosy.workers.engines.cosyvoice:CosyVoiceEngine",
    # Test/benchmark engine: a sine tone with controlled timing. Never a default.
    "tone": "cosy.workers.engines.tone:ToneEngine",
}


def load_engine(name: str, **options: Any) -> Engine:
    """The named engine, constructed with ``options``; a generator engine comes in its threaded adapter."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(sorted(ENGINES))}")
    module_name, _, cls_name = ENGINES[name].partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    return as_engine(cls(**options))


__all__ = ["ENGINES", "Engine", "EngineError", "Sink", "SynthesisRequest", "VoiceInfo", "as_engine", "load_engine"]
