"""A pass-through ``Normalizer`` (the frontend builds one at load). For the random-model timing only: see
bench/gpu_shims/README.md."""

from __future__ import annotations


class Normalizer:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def normalize(self, text: str) -> str:
        return text
