"""``mel``: the Slaney mel filterbank of matcha's ``mel_spectrogram`` (the flow's prompt features). For the
random-model timing only: see bench/gpu_shims/README.md."""

from .._mel import mel

__all__ = ["mel"]
