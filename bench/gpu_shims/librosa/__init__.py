"""Stand-in for librosa: ``librosa.filters.mel`` only. For the random-model timing only (bench/gpu-check.sh,
used only where librosa is not importable): see bench/gpu_shims/README.md."""

from . import filters  # noqa: F401
