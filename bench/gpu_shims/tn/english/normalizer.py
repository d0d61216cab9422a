"""The same pass-through ``Normalizer`` as ``tn.chinese.normalizer`` (the frontend builds one of each at load). For
the random-model timing only: see bench/gpu_shims/README.md."""

from __future__ import annotations

from ..chinese.normalizer import Normalizer

__all__ = ["Normalizer"]
