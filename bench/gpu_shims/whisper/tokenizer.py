"""``Tokenizer``: imported by cosyvoice/tokenizer/tokenizer.py for CosyVoice v1's whisper tokenizer, which
CosyVoice2/3 (Qwen2's tokenizer) never build. For the random-model timing only: see bench/gpu_shims/README.md."""

from __future__ import annotations


class Tokenizer:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("bench/gpu_shims: whisper's tokenizer is not available in this stand-in")
