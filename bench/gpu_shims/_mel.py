"""A Slaney mel filterbank in numpy, as ``librosa.filters.mel`` computes it with its defaults (htk=False,
norm="slaney"). For the random-model timing only (bench/gpu-check.sh): see bench/gpu_shims/README.md."""

from __future__ import annotations

import numpy as np

_F_SP = 200.0 / 3  # Hz per mel below 1 kHz (Slaney)
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asanyarray(hz, dtype=np.float64)
    mel = hz / _F_SP
    log = hz >= _MIN_LOG_HZ
    return np.where(log, _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP, mel)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asanyarray(mel, dtype=np.float64)
    hz = mel * _F_SP
    return np.where(mel >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL)), hz)


def mel(*, sr: float, n_fft: int, n_mels: int = 128, fmin: float = 0.0, fmax: float | None = None,
        dtype: type = np.float32) -> np.ndarray:
    """[n_mels, 1 + n_fft // 2] triangular filters, area-normalised (Slaney)."""
    fmax = float(sr) / 2 if fmax is None else float(fmax)
    fft_hz = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_hz)
    ramps = np.subtract.outer(mel_hz, fft_hz)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.astype(dtype)
