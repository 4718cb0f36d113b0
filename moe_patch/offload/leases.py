"""What the engine hands a caller that computes one expert: its weights, and how to give them back.

- :class:`SlotLease`: the expert sits in a device slot, pinned until released (then it may be refilled);
- :class:`HostLease`: the CPU computes it from its host-tier entry, pinned until released;
- :class:`ReadLease`: every slot was pinned by the layer (a budget below its active experts), so the
  expert was read for this call only; nothing to give back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Lease:
    weights: dict[str, torch.Tensor] = field(repr=False)
    #: undoes the pin that keeps the weights where they are (None: nothing is held)
    unpin: Callable[[], None] | None = field(default=None, repr=False)

    #: the expert is computed on the CPU, wherever the rows are
    on_cpu = False

    def release(self) -> None:
        """Give the expert back (its slot or host entry may be evicted again)."""
        if self.unpin is not None:
            self.unpin()
            self.unpin = None


@dataclass
class SlotLease(Lease):
    """An expert in a device slot (``weights`` empty when it was acquired for the CPU kernels, which read the
    slot's entry itself)."""

    slot: int | None = None


@dataclass
class HostLease(Lease):
    """An expert the CPU computes from its host-tier entry (``stored``: the entry's tensors as the host tier
    keeps them; ``weights`` empty when the CPU kernels read those instead)."""

    on_cpu = True
    stored: dict | None = field(default=None, repr=False)


@dataclass
class ReadLease(Lease):
    """Weights read for this call alone."""
