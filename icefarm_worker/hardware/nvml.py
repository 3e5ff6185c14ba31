"""NVIDIA GPUs as devices, found with NVML (the optional `nvidia-ml-py` package, import name
`pynvml`: `pip install 'icefarm-grpc[gpu]'`).

Each GPU becomes a device of kind `gpu` whose id is its UUID, with labels `name` (as NVML
says, e.g. "NVIDIA A100-SXM4-40GB"), `model` (the same in selector-friendly form,
`nvidia-a100-sxm4-40gb`) and `gpu_index`, and the property `gpu_memory_mb` (total memory).
Without the package, or when NVML does not start (no driver, no GPU), there are no GPUs: one
info line in the log, never an error.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import structlog

from icefarm_worker.hardware.base import DiscoveredDevice

log = structlog.get_logger(__name__)
GPU_KIND = "gpu"
_MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    """One GPU: the device, and its properties (gpu_memory_mb)."""

    device: DiscoveredDevice
    properties: dict[str, float]


def _text(value: Any) -> str:
    # nvidia-ml-py before 11.5 answered bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _model(name: str) -> str:
    return re.sub(r"[^a-z0-9_.]+", "-", name.lower()).strip("-")


def find_gpus() -> list[Gpu]:
    """Every GPU NVML reports; [] without NVML (logged once, at info)."""
    try:
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        log.info("no NVML (pip install 'icefarm-grpc[gpu]'): no GPUs")
        return []
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError and friends: no driver, no GPU
        log.info("NVML did not start: no GPUs", error=str(exc))
        return []
    try:
        gpus = [_gpu(nvml, index) for index in range(nvml.nvmlDeviceGetCount())]
    except Exception as exc:
        log.info("NVML could not list the GPUs: no GPUs", error=str(exc))
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed", error=str(exc))
    log.info("GPUs found", count=len(gpus), ids=[g.device.device_id for g in gpus])
    return gpus


def _gpu(nvml: Any, index: int) -> Gpu:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = _text(nvml.nvmlDeviceGetName(handle))
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    device = DiscoveredDevice(
        device_id=_text(nvml.nvmlDeviceGetUUID(handle)),
        kind=GPU_KIND,
        labels={"name": name, "model": _model(name), "gpu_index": str(index)},
        flashable=False,
    )
    return Gpu(device, {"gpu_memory_mb": float(int(memory.total) // _MIB)})
