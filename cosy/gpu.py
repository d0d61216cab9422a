"""GPU facts through NVML (the ``nvidia-ml-py`` package, module ``pynvml``), with a clean "no GPU" path.

Nothing here imports torch or initialises CUDA, so ``cosy up`` can count GPUs before it starts workers
(each with its own ``CUDA_VISIBLE_DEVICES``). NVML numbers devices physically and ignores
``CUDA_VISIBLE_DEVICES``; :func:`nvml_index` maps a worker's visible device back to NVML's index.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any

log = logging.getLogger("cosy.gpu")

METRIC_KEYS = ("gpu_mem_used_mb", "gpu_mem_total_mb", "gpu_util_pct", "gpu_temp_c", "gpu_power_w", "gpu_name")
NO_GPU = "no GPU"


def load_nvml(nvml: ModuleType | None = None) -> ModuleType | None:
    """The NVML module, initialised; None when the package or the driver is missing."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded...: no usable GPU
        log.debug("NVML unavailable: %s", exc)
        return None
    return nvml


def count_gpus(nvml: ModuleType | None = None) -> int:
    """How many NVIDIA GPUs NVML sees (0 without the package, the driver or a GPU)."""
    lib = load_nvml(nvml)
    if lib is None:
        return 0
    try:
        return int(lib.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        _shutdown(lib)


def nvml_index(visible: str | None = None) -> int | str:
    """The NVML device for this process's first CUDA device: an index, or a ``GPU-...`` UUID string."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    first = visible.split(",")[0].strip()
    if not first:
        return 0
    return int(first) if first.isdigit() else first


class GpuMonitor:
    """Reads one GPU's memory, utilisation, temperature and power. Never raises: a failed read is left out."""

    def __init__(self, device: int | str | None = None, nvml: ModuleType | None = None) -> None:
        self._nvml = load_nvml(nvml)
        self._handle: Any = None
        self.name = ""
        if self._nvml is None:
            return
        device = nvml_index() if device is None else device
        try:
            if isinstance(device, str):
                self._handle = self._nvml.nvmlDeviceGetHandleByUUID(device)
            else:
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(int(device))
            self.name = _text(self._nvml.nvmlDeviceGetName(self._handle))
        except Exception as exc:
            log.warning("NVML has no device %s: %s", device, exc)
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def metrics(self) -> dict[str, float | str]:
        """The ``gpu_*`` keys for heartbeats; {} when there is no GPU (see :func:`describe`)."""
        if self._handle is None:
            return {}
        lib, h = self._nvml, self._handle
        out: dict[str, float | str] = {"gpu_name": self.name}
        reads = {
            "memory": lambda: lib.nvmlDeviceGetMemoryInfo(h),
            "gpu_util_pct": lambda: float(lib.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_temp_c": lambda: float(lib.nvmlDeviceGetTemperature(h, getattr(lib, "NVML_TEMPERATURE_GPU", 0))),
            "gpu_power_w": lambda: lib.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML reports milliwatts
        }
        for key, read in reads.items():
            try:
                value = read()
            except Exception:  # e.g. NVMLError_NotSupported for power on some boards
                continue
            if key == "memory":
                out["gpu_mem_used_mb"] = round(value.used / 2**20, 1)
                out["gpu_mem_total_mb"] = round(value.total / 2**20, 1)
            else:
                out[key] = round(value, 1)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            _shutdown(self._nvml)
            self._nvml = None
            self._handle = None


def describe(metrics: dict[str, Any]) -> str:
    """One line for ``cosy status``: the GPU figures of a worker's heartbeat, or 'no GPU'."""
    if "gpu_mem_used_mb" not in metrics:
        return NO_GPU
    parts = [f"{metrics['gpu_mem_used_mb']:.0f}/{metrics.get('gpu_mem_total_mb', 0):.0f} MB"]
    if "gpu_util_pct" in metrics:
        parts.append(f"{metrics['gpu_util_pct']:.0f}%")
    if "gpu_temp_c" in metrics:
        parts.append(f"{metrics['gpu_temp_c']:.0f}°C")
    if "gpu_power_w" in metrics:
        parts.append(f"{metrics['gpu_power_w']:.0f} W")
    return " ".join(parts)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _shutdown(lib: ModuleType) -> None:
    try:
        lib.nvmlShutdown()
    except Exception:
        pass
