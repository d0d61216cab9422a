"""``read``: imported by matcha/utils/audio.py, never called on the engine's path. For the random-model timing
only: see bench/gpu_shims/README.md."""

from __future__ import annotations


def read(filename: str, mmap: bool = False) -> tuple:
    raise NotImplementedError("bench/gpu_shims: scipy.io.wavfile.read is not available in this stand-in")
