"""Stand-in for modelscope: ``snapshot_download`` raises (the library calls it only for a model id, not a
folder; there is no network on a GPU check). For the random-model timing only: see bench/gpu_shims/README.md."""

from __future__ import annotations


def snapshot_download(model_id: str, *args: object, **kwargs: object) -> str:
    raise RuntimeError(f"bench/gpu_shims: no model downloads ({model_id!r}): give a model folder")
