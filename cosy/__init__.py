"""cosy: a self-hosted streaming text-to-speech daemon (ZeroMQ broker, warm workers, CosyVoice and Piper)."""

__version__ = "0.1.0"
