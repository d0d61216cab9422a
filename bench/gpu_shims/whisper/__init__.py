"""Stand-in for openai-whisper: ``log_mel_spectrogram`` as whisper computes it (16 kHz audio, 400-point STFT,
hop 160, Slaney mel filters, log10 clamped to 8 below the peak, scaled), which the CosyVoice frontend feeds
to the speech tokenizer once per voice. For the random-model timing only (bench/gpu-check.sh, used only where
whisper is not importable; the real package imports numba): see bench/gpu_shims/README.md."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .._mel import mel

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


@functools.cache
def _filters(n_mels: int) -> np.ndarray:
    return mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)


def log_mel_spectrogram(audio: torch.Tensor | np.ndarray, n_mels: int = 80, padding: int = 0,
                        device: str | torch.device | None = None) -> torch.Tensor:
    if not torch.is_tensor(audio):
        if isinstance(audio, str):
            raise NotImplementedError("bench/gpu_shims whisper: pass audio samples, not a file name")
        audio = torch.from_numpy(np.asarray(audio))
    if device is not None:
        audio = audio.to(device)
    if padding > 0:
        audio = torch.nn.functional.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT).to(audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(_filters(n_mels)).to(audio.device)
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
