"""Stand-in for WeTextProcessing (``tn``): pass-through normalizers. For the random-model timing only
(bench/gpu-check.sh, used only where ``tn`` is not importable: pynini cannot travel): see
bench/gpu_shims/README.md."""
