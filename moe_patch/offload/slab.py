"""The device tier as fixed slots: bookkeeping in tensors, compute-ready experts in preallocated slabs.

A :class:`SlotTable` holds up to ``N`` experts (``N = budget // bytes per expert``) of the layers that
share one expert layout. Which expert sits in which slot, pins, recency and frequency are small
tensors, so a layer's lookups, hits, touches and victim choices are a few tensor operations, not a
Python call per expert:

- ``slot_of[layer, expert]``: the slot holding it, or -1; ``owner[slot]``: ``(layer, expert)`` or -1;
- ``pins[slot]``: experts in use by the layer being computed (never evicted);
- ``last_used[slot]``, ``freq[layer, expert]`` (kept across evictions) and ``hot``: what the run's
  :class:`~.policy.EvictionPolicy` scores to choose a victim.

When the experts are kept compute-ready (the model's dtype, decoded), their tensors live in a
:class:`TensorSlab`: one ``[N, *shape]`` tensor per parameter, so every cached expert of a layer is a
slot index into the same tensors and one grouped GEMM over slot indices computes them all. Experts
kept stored or quantized (decoded at each use) are objects in a Python list beside the table instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .policy import POLICIES, EvictionPolicy

Key = tuple[int, int]


class SlotTable:
    """Slot bookkeeping for one expert layout: ``capacity`` slots of ``slot_bytes`` each."""

    def __init__(
        self,
        layers: list[int],
        num_experts: int,
        capacity: int,
        slot_bytes: int,
        *,
        policy: EvictionPolicy | str = "lru",
        hot: Iterable[Key] = (),
        budget: int | None = None,
        name: str = "expert_cache",
    ):
        self.name = name
        self.policy = POLICIES[policy] if isinstance(policy, str) else policy
        self.layers = list(layers)
        self.capacity = capacity
        self.slot_bytes = slot_bytes
        self.budget = budget
        n_layers = max(self.layers) + 1 if self.layers else 0
        self.slot_of = torch.full((n_layers, num_experts), -1, dtype=torch.int64)
        self.owner = torch.full((capacity, 2), -1, dtype=torch.int64)
        self.pins = torch.zeros(capacity, dtype=torch.int32)
        self.last_used = torch.zeros(capacity, dtype=torch.int64)
        self.freq = torch.zeros((n_layers, num_experts), dtype=torch.int64)
        self.hot = torch.zeros((n_layers, num_experts), dtype=torch.bool)
        for layer, expert in hot:
            if 0 <= layer < n_layers and 0 <= expert < num_experts:
                self.hot[layer, expert] = True
        self.clock = 0
        self.evictions = 0
        self.peak_slots = 0
        self.version = 0  # bumped whenever a slot changes hands (maps derived from slot_of check it)

    # -- queries -------------------------------------------------------------------------------
    @property
    def used_slots(self) -> int:
        return int((self.owner[:, 0] >= 0).sum())

    @property
    def used(self) -> int:
        return self.used_slots * self.slot_bytes

    @property
    def peak(self) -> int:
        return self.peak_slots * self.slot_bytes

    def __len__(self) -> int:
        return self.used_slots

    def __contains__(self, key: Key) -> bool:
        layer, expert = key
        return layer < self.slot_of.shape[0] and bool(self.slot_of[layer, expert] >= 0)

    def keys(self) -> list[Key]:
        return [(int(a), int(b)) for a, b in self.owner[self.owner[:, 0] >= 0].tolist()]

    def lookup(self, layer: int, experts: torch.Tensor) -> torch.Tensor:
        """Slots of ``experts`` (a CPU index tensor) of ``layer``; -1 where not cached."""
        return self.slot_of[layer, experts]

    def slot(self, key: Key) -> int:
        return int(self.slot_of[key[0], key[1]])

    # -- use -----------------------------------------------------------------------------------
    def touch(self, layer: int, experts: torch.Tensor, slots: torch.Tensor) -> None:
        """Mark ``experts`` (in ``slots``) used now: recency for LRU, counts for LFU."""
        self.clock += 1
        self.last_used[slots] = self.clock
        self.freq[layer, experts] += 1

    def pin(self, slots: torch.Tensor) -> None:
        self.pins.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))

    def unpin(self, slots: torch.Tensor) -> None:
        self.pins.index_add_(0, slots, -torch.ones_like(slots, dtype=torch.int32))
        self.pins.clamp_(min=0)

    # -- placement -----------------------------------------------------------------------------
    @property
    def homes(self) -> bool:
        """Every expert of these layers has a slot of its own (the budget holds them all): then expert ``e``
        of the ``i``-th layer always lives in slot ``i * E + e``, so a layer's slots are one contiguous range
        and its grouped GEMM runs over that layer's experts only, as the resident model's does."""
        return self.capacity >= len(self.layers) * self.slot_of.shape[1]

    def victim(self, key: Key | None = None) -> int | None:
        """The slot to fill next: ``key``'s own slot when every expert has one (:attr:`homes`), else a free
        one, else the policy's choice among unpinned ones (None: all pinned)."""
        if key is not None and self.homes:
            slot = self.layers.index(key[0]) * self.slot_of.shape[1] + key[1]
            return slot if int(self.pins[slot]) == 0 and int(self.owner[slot, 0]) < 0 else None
        free = ((self.owner[:, 0] < 0) & (self.pins == 0)).nonzero()  # a pinned empty slot is being filled
        if free.numel():
            return int(free[0])
        candidates = (self.pins == 0).nonzero().flatten()
        if candidates.numel() == 0:
            return None
        owners = self.owner[candidates]
        score = self.policy.score(
            self.last_used[candidates],
            self.freq[owners[:, 0], owners[:, 1]],
            self.hot[owners[:, 0], owners[:, 1]],
            self.clock,
        )
        return int(candidates[torch.argmin(score)])

    def assign(self, slot: int, key: Key) -> Key | None:
        """Put ``key`` in ``slot``; returns the key it evicted (None if the slot was free)."""
        old = self.owner[slot].tolist()
        evicted = None
        if old[0] >= 0:
            self.slot_of[old[0], old[1]] = -1
            self.evictions += 1
            evicted = (old[0], old[1])
        self.owner[slot, 0], self.owner[slot, 1] = key
        self.slot_of[key[0], key[1]] = slot
        self.version += 1  # after the change: a map read in between is rebuilt at the next look
        self.clock += 1
        self.last_used[slot] = self.clock
        self.freq[key[0], key[1]] += 1
        self.peak_slots = max(self.peak_slots, self.used_slots)
        return evicted

    def release(self, slot: int) -> Key | None:
        """Evict whatever ``slot`` holds, to refill it (returns the key it held)."""
        old = self.owner[slot].tolist()
        if old[0] < 0:
            return None
        self.slot_of[old[0], old[1]] = -1
        self.owner[slot] = -1
        self.evictions += 1
        self.version += 1
        return (old[0], old[1])


class TensorSlab:
    """``capacity`` compute-ready experts as one ``[capacity, *shape]`` tensor per parameter."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, capacity: int, device: torch.device):
        self.shapes = shapes
        self.dtype = dtype
        # torch.empty does not touch the pages on CPU: RSS grows only as slots are filled
        self.tensors = {n: torch.empty((capacity, *s), dtype=dtype, device=device) for n, s in shapes.items()}

    def view(self, slot: int) -> dict[str, torch.Tensor]:
        return {n: t[slot] for n, t in self.tensors.items()}

    @staticmethod
    def nbytes_per_slot(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return sum(math.prod(s) for s in shapes.values()) * size
