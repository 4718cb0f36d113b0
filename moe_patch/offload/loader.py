"""Moving experts between tiers: source -> host tier -> device slot, on demand or in the background.

A device slot is reserved (pinned) while it is filled, outside the lock; background loads never evict the
experts of the layer being computed (``protected``); a background load that arrives after its layer began
is remembered with the tier it came from (``arrived``) so the forward that uses it counts it right.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..formats import materialize
from .backends import DeviceBackend
from .cache import Key, TierCache
from .device_tier import DeviceTier, ExpertWeights, SlotGroup
from .plan import EnginePlan
from .reader import Reader
from .slab import SlotTable
from .sources import ExpertSource


class TierLoader:
    def __init__(
        self,
        dev: DeviceTier,
        host: TierCache,
        reader: Reader,
        source: ExpertSource,
        backend: DeviceBackend,
        plan: EnginePlan,
        lock: threading.RLock,
    ):
        self.dev, self.host, self.reader, self.source = dev, host, reader, source
        self.backend, self.plan, self.lock = backend, plan, lock
        self.protected: set[Key] = set()  # the current layer's experts: background inserts never evict them
        self.arrived: dict[Key, str] = {}  # loaded by a reader after its layer began: the tier it came from

    # -- device slots ------------------------------------------------------------------------------
    def insert(self, key: Key, host: ExpertWeights | None, background: bool) -> int | None:
        """Bring ``key`` into a device slot (evicting by policy, never a pinned slot). Returns the slot,
        left pinned for the caller, or None when every slot is pinned (the caller then computes from
        ``host``)."""
        group = self.dev.group_of[key[0]]
        with self.lock:
            slot = group.table.slot(key)
            if slot >= 0:
                group.table.pin(torch.tensor([slot]))
                return slot
            if background:  # never evict what the current layer is about to use
                protected = [group.table.slot(k) for k in self.protected if k in group.table]
                guard = torch.tensor([s for s in protected if s >= 0], dtype=torch.int64)
                group.table.pin(guard)
            try:
                slot = group.table.victim(key)
            finally:
                if background:
                    group.table.unpin(guard)
            if slot is None:
                return None
            group.table.release(slot)
            if group.slab is None:
                group.objects[slot] = None
            group.table.pin(torch.tensor([slot]))
            self.backend.forget_slot(group.slot_id(slot))
        try:
            self._fill(group, slot, key, host, background)
        except BaseException:
            with self.lock:
                group.table.unpin(torch.tensor([slot]))
            raise
        with self.lock:
            group.table.assign(slot, key)
        return slot

    def _fill(self, group: SlotGroup, slot: int, key: Key, host: ExpertWeights | None, background: bool) -> None:
        """Write expert ``key`` into ``slot``: from the host entry (copied, and decoded when the slots hold
        decoded experts) or, with ``host`` None on a merged CPU tier, read from the source straight into
        the slot. Called without the lock; the slot is reserved (pinned) by the caller."""
        if group.slab is None:  # object slots: the entry itself (moved to the device on CUDA)
            group.objects[slot] = self.backend.device_object(host, background)
            return
        views = group.slab.view(slot)
        if host is None:
            self.reader.read(key, out=views)
            return
        self.backend.fill(views, host, background, group.slot_id(slot))

    def weights(self, group: SlotGroup, slot: int) -> dict[str, torch.Tensor]:
        """The decoded weights in ``slot``, once any copy filling it is done."""
        self.wait(group, slot)
        return {n: materialize(t) for n, t in group.entry(slot).items()}

    def wait(self, group: SlotGroup, slot: int) -> None:
        self.backend.wait_slot(group.slot_id(slot), group.objects[slot] if group.slab is None else None)

    def unpin(self, table: SlotTable, slots: torch.Tensor) -> None:
        """Slots the forward is done with may be refilled; on CUDA only once its queued kernels ran."""
        self.backend.computed()
        with self.lock:
            table.unpin(slots)

    # -- loading -------------------------------------------------------------------------------------
    def load(self, key: Key, background: bool) -> tuple[int | None, ExpertWeights | None, str, int]:
        """Bring ``key`` into a device slot: ``(slot or None, host entry, source tier, bytes moved)``."""
        with self.lock:
            host, tier = self.host.get(key), "host"
        if host is None and self.plan.merged and self.plan.compute_ready:
            slot = self.insert(key, None, background)  # straight from the source into the slot
            if slot is not None:
                return slot, None, self.source.tier, self.source.nbytes(*key)
        if host is None:
            host = self.reader.read(key)
            tier = host.tier
            with self.lock:
                if self.host.enabled and key not in self.host:
                    self.host.put(key, host, host.nbytes)
        moved = host.nbytes if tier == "host" else host.moved
        return self.insert(key, host, background), host, tier, moved

    def background_load(self, key: Key) -> str:
        """A prefetch or early read: ``key`` into a device slot, unpinned; returns the tier it came from."""
        with self.lock:
            if key in self.dev:
                return "device"
        slot, _, tier, _ = self.load(key, background=True)
        if slot is not None:
            with self.lock:
                self.dev.group_of[key[0]].table.unpin(torch.tensor([slot]))
                self.arrived[key] = tier
        return tier

    def from_read(self, host: ExpertWeights) -> dict[str, Any]:
        """Weights to compute with straight from a read (no slot could be had), where the compute runs."""
        return {n: materialize(self.backend.to_device(t)) for n, t in host.tensors.items()}
