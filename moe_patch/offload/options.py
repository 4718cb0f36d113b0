"""User-facing offload settings: one dataclass that checks itself when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from ..errors import MoEConfigError
from ..formats import cache_format
from .budget import parse_bytes
from .policy import POLICIES

Policy = Literal["lru", "lfu", "pinned-hot"]
CpuCompute = Literal["auto", "always", "never"]
DeviceFormat = Literal["auto", "stored", "dequantized"]
DirectIO = Literal["auto", "always", "never"]
DEVICE_FORMATS: tuple[str, ...] = get_args(DeviceFormat)


@dataclass
class OffloadOptions:
    """How experts are paged between the compute device, host RAM and the checkpoint.

    Every field is checked when the options are made (one clear error naming the field), so a bad value
    never reaches a half-offloaded model.

    Attributes:
        device: compute device, ``"cpu"`` or ``"cuda[:n]"``. On CPU the device cache is the
            resident RAM tier.
        expert_cache: byte budget of the device cache (int or ``"8GiB"``); ``None`` = no limit; ``"auto"`` =
            the device's free memory less the rest of the run and headroom, chosen at attach (:mod:`.auto_budget`).
        host_cache: byte budget of the host-RAM cache (pinned on CUDA); 0 switches it off.
        quantize_experts: ``None``, ``"nf4"`` or ``"int8"``: store experts quantized in the caches.
        prefetch: read the next layer's likely experts in the background.
        policy: eviction in both caches: ``"lru"``, ``"lfu"`` or ``"pinned-hot"`` (:mod:`.policy`).
        hot_experts: ``(layer, expert)`` pairs the ``pinned-hot`` policy keeps longest.
        cpu_compute: compute host-resident misses on the CPU when the cost model says it is
            cheaper than copying them (``"auto"``), ``"always"`` or ``"never"``.
        checkpoint: safetensors directory to page experts from. ``None``: the experts the model
            already holds in RAM are the bottom tier (``patch_model`` on a loaded model).
        calibrate: measure DRAM/GEMM (and PCIe) bandwidths for the cost model and the statistics.
        max_prefetch_per_layer: cap on experts prefetched per layer (default: half the device cache).
        context_tokens: tokens of context (KV cache, prefill activations) ``expert_cache="auto"`` leaves room
            for; None: the model's context, at most 4096.
        device_format: quantized checkpoints (FP8, MXFP4, compressed-tensors) only: the device cache
            keeps experts ``"stored"`` (decoded each time they run: more experts per byte) or
            ``"dequantized"`` (decoded once when cached); ``"auto"`` lets the cost model choose. The host
            tier and disk reads always hold the stored bytes.
        direct_io: read experts from the checkpoint past the page cache (``O_DIRECT``): ``"always"``,
            ``"never"``, or ``"auto"``: when the checkpoint's experts are larger than the memory the page cache
            could still take (RAM, or the cgroup limit), so cached pages would only be evicted again
            (:mod:`moe_patch.io.direct`). File systems without ``O_DIRECT`` read through the page cache.
    """

    device: str = "cpu"
    expert_cache: int | str | None = None
    host_cache: int | str | None = 0
    quantize_experts: Literal["nf4", "int8"] | None = None
    prefetch: bool = True
    policy: Policy = "lru"
    hot_experts: tuple[tuple[int, int], ...] = ()
    cpu_compute: CpuCompute = "auto"
    checkpoint: str | None = None
    calibrate: bool = True
    max_prefetch_per_layer: int | None = None
    device_format: DeviceFormat = "auto"
    context_tokens: int | None = None
    direct_io: DirectIO = "auto"

    def __post_init__(self) -> None:
        self.torch_device  # noqa: B018 - parsed and checked here
        if self.policy not in POLICIES:
            raise MoEConfigError(f"policy={self.policy!r}: choose one of {', '.join(POLICIES)}.")
        if self.cpu_compute not in get_args(CpuCompute):
            raise MoEConfigError(f"cpu_compute={self.cpu_compute!r}: choose 'auto', 'always' or 'never'.")
        if self.direct_io not in get_args(DirectIO):
            raise MoEConfigError(f"direct_io={self.direct_io!r}: choose 'auto', 'always' or 'never'.")
        if self.device_format not in DEVICE_FORMATS:
            raise MoEConfigError(f"device_format={self.device_format!r}: choose one of {', '.join(DEVICE_FORMATS)}.")
        cache_format(self.quantize_experts)  # a known name, its library installed
        self.expert_cache_bytes, self.host_cache_bytes  # noqa: B018 - the budgets parse
        if self.max_prefetch_per_layer is not None and (
            not isinstance(self.max_prefetch_per_layer, int) or self.max_prefetch_per_layer < 0
        ):
            raise MoEConfigError(f"max_prefetch_per_layer={self.max_prefetch_per_layer!r}: expected an integer >= 0.")
        if self.context_tokens is not None and (
            not isinstance(self.context_tokens, int) or isinstance(self.context_tokens, bool) or self.context_tokens < 1
        ):
            raise MoEConfigError(f"context_tokens={self.context_tokens!r}: expected an integer >= 1 or None.")
        self.hot_experts = tuple(tuple(k) for k in self.hot_experts)

    @property
    def torch_device(self) -> torch.device:
        """The compute device, checked against this machine."""
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise MoEConfigError(f"device={self.device!r}: not a device name; use 'cpu', 'cuda' or 'cuda:N'.") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MoEConfigError(f"device={self.device!r} but CUDA is not available here; use device='cpu'.")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()  # pragma: no cover - needs a GPU
            raise MoEConfigError(
                f"device={self.device!r} but this machine has {n} CUDA device{'s' * (n != 1)} (cuda:0 to cuda:{n - 1})."
            )
        if device.type not in ("cpu", "cuda"):
            raise MoEConfigError(f"device={self.device!r}: offloading supports 'cpu' and 'cuda'.")
        return device

    @property
    def auto_expert_cache(self) -> bool:
        """Whether the device-cache budget is chosen at attach from free memory (``expert_cache="auto"``)."""
        return isinstance(self.expert_cache, str) and self.expert_cache.strip().lower() == "auto"

    @property
    def expert_cache_bytes(self) -> int | None:
        """The device-cache budget in bytes (None: no limit, or ``"auto"`` not yet chosen)."""
        return None if self.auto_expert_cache else parse_bytes(self.expert_cache, name="expert_cache")

    @property
    def host_cache_bytes(self) -> int | None:
        return parse_bytes(self.host_cache, name="host_cache")

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
