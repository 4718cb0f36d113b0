"""Where the engine's device tier lives: the CPU (one RAM tier, nothing to copy or wait for) or a CUDA GPU
(copies on a side stream, events per slot, pinned host memory). Chosen once when the engine is built;
the engine calls the same methods on either."""

from __future__ import annotations

import threading

import torch

from .base import DeviceBackend
from .cpu import CpuBackend


def make_backend(device: torch.device, lock: threading.RLock) -> DeviceBackend:
    """The backend of ``device`` (``lock``: the engine's, which guards the slot tables this shares)."""
    if device.type == "cuda":  # pragma: no cover - GPU only
        from .cuda import CudaBackend

        return CudaBackend(device, lock)
    return CpuBackend(device, lock)


__all__ = ["CpuBackend", "DeviceBackend", "make_backend"]
