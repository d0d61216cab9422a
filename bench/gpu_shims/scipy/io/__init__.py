"""Stand-in for scipy.io (only ``wavfile``). For the random-model timing only: see bench/gpu_shims/README.md."""
