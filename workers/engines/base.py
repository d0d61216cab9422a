"""The engine interface every speech engine implements (see ARCHITECTURE.md)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language: str = ""
    description: str = ""


@dataclass(frozen=True)
class SynthesisRequest:
    text: str
    voice: str
    speed: float = 1.0
    job: str = ""
    instruct: str = ""  # for instruct-capable engines; others ignore it
    # Set when the broker cancels the run: engines stop between chunks.
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False)


class EngineError(RuntimeError):
    """A synthesis failed. ``retryable`` says whether another worker may succeed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@runtime_checkable
class Engine(Protocol):
    name: str
    model: str
    sample_rate: int
    device: str
    # How many syntheses the worker runs at once on this engine.
    capacity: int

    def voices(self) -> list[VoiceInfo]: ...

    @property
    def default_voice(self) -> str: ...

    def synthesize(self, request: SynthesisRequest) -> Iterator[np.ndarray]:
        """Yield mono audio as it is produced: int16 or float32 arrays at ``sample_rate``."""
        ...

    def metrics(self) -> dict[str, float]:
        """Device figures for heartbeats (GPU memory, utilisation...); may be empty."""
        ...

    def close(self) -> None: ...


class RefreshableVoices(Protocol):
    """Optional: engines whose voices can change while they run (zero-shot voices from folders)."""

    def refresh_voices(self) -> bool:
        """Re-read the voices; True when the set changed."""
        ...
