"""What the engine hands a caller that computes one expert: its weights, and how to give them back.

- :class:`SlotLease`: the expert sits in a device slot, pinned until released (then it may be refilled);
- :class:`HostLease`: the CPU computes it from its host-tier entry, pinned until released;
- :class:`ReadLease`: every slot was pinned by the layer (a budget below its active experts), so the
  expert was read for this call only; nothing to give back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import Key
    from .device_tier import SlotGroup
    from .engine import OffloadEngine


@dataclass
class Lease:
    weights: dict[str, torch.Tensor] = field(repr=False)

    #: the expert is computed on the CPU, wherever the rows are
    on_cpu = False

    def release(self, engine: OffloadEngine) -> None:
        """Give the expert back (its slot or host entry may be evicted again)."""


@dataclass
class SlotLease(Lease):
    group: SlotGroup = None
    slot: int = -1

    def release(self, engine: OffloadEngine) -> None:
        engine.unpin(self.group.table, torch.tensor([self.slot]))


@dataclass
class HostLease(Lease):
    key: Key = (-1, -1)
    on_cpu = True

    def release(self, engine: OffloadEngine) -> None:
        with engine.lock:
            engine.host.unpin(self.key)


@dataclass
class ReadLease(Lease):
    """Weights read for this call alone."""
