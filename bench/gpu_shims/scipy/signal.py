"""``get_window("hann", n, fftbins=True)``: the periodic Hann window of HiFT's iSTFT (cosyvoice/hifigan/
generator.py). For the random-model timing only: see bench/gpu_shims/README.md."""

from __future__ import annotations

import numpy as np


def get_window(window: str | tuple, nx: int, fftbins: bool = True) -> np.ndarray:
    name = window[0] if isinstance(window, tuple) else window
    if name not in ("hann", "hanning"):
        raise NotImplementedError(f"bench/gpu_shims scipy.signal.get_window: only 'hann', not {window!r}")
    if nx <= 1:
        return np.ones(max(nx, 0))
    n = np.arange(nx)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / (nx if fftbins else nx - 1))
