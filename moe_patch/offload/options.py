"""User-facing offload settings (one dataclass; budgets are parsed and checked at attach time)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEVICE_FORMATS = ("auto", "stored", "dequantized")


@dataclass
class OffloadOptions:
    """How experts are paged between the compute device, host RAM and the checkpoint.

    Attributes:
        device: compute device, ``"cpu"`` or ``"cuda[:n]"``. On CPU the device cache is the
            resident RAM tier.
        expert_cache: byte budget of the device cache (int or ``"8GiB"``); ``None`` = no limit.
        host_cache: byte budget of the host-RAM cache (pinned on CUDA); 0 switches it off.
        quantize_experts: ``None``, ``"nf4"`` or ``"int8"``: store experts quantized in the caches.
        prefetch: read the next layer's likely experts in the background.
        policy: device-cache eviction: ``"lru"``, ``"lfu"`` or ``"pinned-hot"``.
        hot_experts: ``(layer, expert)`` pairs the ``pinned-hot`` policy keeps longest.
        cpu_compute: compute host-resident misses on the CPU when the cost model says it is
            cheaper than copying them (``"auto"``), ``"always"`` or ``"never"``.
        checkpoint: safetensors directory to page experts from. ``None``: the experts the model
            already holds in RAM are the bottom tier (``patch_model`` on a loaded model).
        calibrate: measure DRAM/GEMM (and PCIe) bandwidths for the cost model and the statistics.
        max_prefetch_per_layer: cap on experts prefetched per layer (default: half the device cache).
        device_format: quantized checkpoints (FP8, MXFP4, compressed-tensors) only: the device cache
            keeps experts ``"stored"`` (decoded each time they run: more experts per byte) or
            ``"dequantized"`` (decoded once when cached); ``"auto"`` lets the cost model choose. The host
            tier and disk reads always hold the stored bytes.
    """

    device: str = "cpu"
    expert_cache: int | str | None = None
    host_cache: int | str | None = 0
    quantize_experts: str | None = None
    prefetch: bool = True
    policy: str = "lru"
    hot_experts: tuple[tuple[int, int], ...] = ()
    cpu_compute: str = "auto"
    checkpoint: str | None = None
    calibrate: bool = True
    max_prefetch_per_layer: int | None = None
    device_format: str = "auto"

    @classmethod
    def coerce(cls, value: Any) -> OffloadOptions:
        """Accept an OffloadOptions, a dict of its fields, or ``True`` (defaults)."""
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"offload= expects OffloadOptions, a dict or True, got {type(value).__name__}")
