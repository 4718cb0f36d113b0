"""The CPU backend: the device slots are host RAM, copies are plain and nothing runs asynchronously."""

from __future__ import annotations

import threading
from typing import Any

import torch

from ...dispatch.experts import ExpertBank, bank_dispatch
from ...formats import StoredTensor


class CpuBackend:
    """The device slots are host RAM: copies are plain, nothing runs asynchronously, nothing is waited for."""

    pins_host = False
    asynchronous = False

    def __init__(self, device: torch.device, lock: threading.RLock):
        self.device = device
        self.lock = lock

    # -- entries ---------------------------------------------------------------------------------------
    def stage(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """A host entry read outside the pool, as the caches keep it (pinned on CUDA)."""
        return tensors

    def fill(self, views: dict[str, torch.Tensor], host: Any, background: bool, slot_id: tuple[int, int]) -> None:
        """Write host entry ``host`` (:class:`~moe_patch.offload.device_tier.ExpertWeights`) into the slot
        ``views``, decoded when it is stored. The slot is reserved by the caller; no lock is held."""
        for n, t in host.tensors.items():
            if isinstance(t, StoredTensor):
                t.dequantize(out=views[n].t() if t.layout.transpose else views[n])
            else:
                views[n].copy_(t)

    def device_object(self, host: Any, background: bool) -> Any:
        """A host entry as an object slot on the device holds it (the entry itself on the CPU)."""
        return host

    def to_device(self, t: Any) -> Any:
        """An entry's tensor where the compute runs (the fallback that computes straight from a read)."""
        return t

    # -- ordering -------------------------------------------------------------------------------------
    def wait_slot(self, slot_id: tuple[int, int], entry: Any = None) -> None:
        """Before the compute reads a slot (or the object ``entry`` in it): nothing to wait for on the CPU."""

    def forget_slot(self, slot_id: tuple[int, int]) -> None:
        """The slot is being refilled: whatever copy filled it before no longer matters."""

    def computed(self) -> None:
        """The compute that read some slots has been queued (called before they are unpinned)."""

    def reap(self, wait_oldest: bool = False) -> bool:
        """Release host copies whose transfer finished; False when none is in flight."""
        return False

    def synchronize(self) -> None:
        """Wait for queued work (the step timings)."""

    # -- compute ---------------------------------------------------------------------------------------
    def routing_table(self, table: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """A small host-made lookup table where the routing lives."""
        return table

    def compute(
        self,
        bank: ExpertBank,
        x: torch.Tensor,
        slot_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        weight_inputs: bool,
    ) -> torch.Tensor:
        """A layer's cached experts in the bank over their slot range (the path that checks and falls back)."""
        return bank_dispatch(bank, x, slot_index, top_k_weights, weight_inputs=weight_inputs)
