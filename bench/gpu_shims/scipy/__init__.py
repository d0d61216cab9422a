"""Stand-in for scipy: the two names the CosyVoice library imports (``signal.get_window``, ``io.wavfile.read``).
For the random-model timing only (bench/gpu-check.sh): see bench/gpu_shims/README.md."""
