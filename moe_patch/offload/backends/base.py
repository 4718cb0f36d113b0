"""What the engine asks of the device its slots live on: :mod:`.cpu` (host RAM, nothing asynchronous) and
:mod:`.cuda` (copies on a side stream, events per slot, pinned host memory) implement it."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ...dispatch.experts import ExpertBank


class DeviceBackend(Protocol):
    device: torch.device
    #: host pool buffers are page-locked (asynchronous host-to-device copies)
    pins_host: bool
    #: slot copies run asynchronously: the compute must wait for them (:meth:`wait_slot`)
    asynchronous: bool

    # entries
    def stage(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """A host entry read outside the pool, as the caches keep it (pinned on CUDA)."""

    def fill(self, views: dict[str, torch.Tensor], host: Any, background: bool, slot_id: tuple[int, int]) -> None:
        """Write a host entry into the slot ``views``, decoded when stored (slot reserved by the caller)."""

    def device_object(self, host: Any, background: bool) -> Any:
        """A host entry as an object slot on the device holds it."""

    def to_device(self, t: Any) -> Any:
        """An entry's tensor where the compute runs (the fallback that computes straight from a read)."""

    # ordering
    def wait_slot(self, slot_id: tuple[int, int], entry: Any = None) -> None:
        """Before the compute reads a slot (or the object ``entry`` in it)."""

    def forget_slot(self, slot_id: tuple[int, int]) -> None:
        """The slot is being refilled: whatever copy filled it before no longer matters."""

    def computed(self) -> None:
        """The compute that read some slots has been queued (called before they are unpinned)."""

    def reap(self, wait_oldest: bool = False) -> bool:
        """Release host copies whose transfer finished; False when none is in flight."""

    def synchronize(self) -> None:
        """Wait for queued work (the step timings)."""

    # compute
    def routing_table(self, table: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """A small host-made lookup table where the routing lives."""

    def compute(
        self,
        bank: ExpertBank,
        x: torch.Tensor,
        slot_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        weight_inputs: bool,
    ) -> torch.Tensor:
        """A layer's cached experts in the bank over their slot range."""
