"""Which cached expert to evict: one :class:`EvictionPolicy` for both tiers (device slots and host cache).

A policy scores the evictable entries from their recency (a clock tick of their last use), how often they
were used (kept across evictions, so a popular expert earns its place back) and whether the caller marked
them hot; the lowest score is evicted. ``OffloadOptions(policy=...)`` selects one for the whole run:

- ``lru``: the least recently used (default; decode reuses recent experts);
- ``lfu``: the least frequently used, the least recent among equals;
- ``pinned-hot``: like LRU, but the ``hot_experts`` given (e.g. the most used experts of a calibration run)
  only go when nothing else can.
"""

from __future__ import annotations

from typing import ClassVar

import torch


class EvictionPolicy:
    """Scores entries; the tiers evict the lowest score among the unpinned ones."""

    name: ClassVar[str]
    #: the score is the recency alone: a tier kept in recency order can take its oldest unpinned entry
    recency_only: ClassVar[bool] = False

    def score(self, last_used: torch.Tensor, uses: torch.Tensor, hot: torch.Tensor, clock: int) -> torch.Tensor:
        """float64 scores of entries with these last-use ticks, use counts and hot flags (``clock``: the
        current tick, so that one use outweighs any recency)."""
        raise NotImplementedError


class LRU(EvictionPolicy):
    name = "lru"
    recency_only = True

    def score(self, last_used, uses, hot, clock):
        return last_used.to(torch.float64)


class LFU(EvictionPolicy):
    name = "lfu"

    def score(self, last_used, uses, hot, clock):
        return uses.to(torch.float64) * (clock + 1) + last_used.to(torch.float64)


class PinnedHot(EvictionPolicy):
    name = "pinned-hot"

    def score(self, last_used, uses, hot, clock):
        return hot.to(torch.float64) * (clock + 1) + last_used.to(torch.float64)


#: the registry ``OffloadOptions.policy`` names
POLICIES: dict[str, EvictionPolicy] = {p.name: p for p in (LRU(), LFU(), PinnedHot())}
