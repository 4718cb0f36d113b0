"""Byte-budgeted expert caches and their eviction policies (pure bookkeeping, no tensors moved here).

A :class:`TierCache` maps ``(layer, expert)`` to an entry with a size in bytes and never holds more
than its budget: an insert that cannot fit without evicting a pinned entry is refused. Policies:

- ``lru``: evict the least recently used entry (default; decode reuses recent experts);
- ``lfu``: evict the least frequently used entry (ties: least recent), frequencies kept across
  evictions so a popular expert earns its place back;
- ``pinned-hot``: like LRU, but the ``hot`` keys given by the caller (e.g. the most used experts
  of a calibration run) are only evicted when nothing else can be.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BudgetError

Key = tuple[int, int]
POLICIES = ("lru", "lfu", "pinned-hot")


@dataclass
class CacheEntry:
    value: Any
    nbytes: int
    pins: int = 0


class TierCache:
    """One tier of the expert hierarchy, with a hard byte budget (``None``: unlimited)."""

    def __init__(self, budget: int | None, policy: str = "lru", hot: Iterable[Key] = (), name: str = "cache"):
        if policy not in POLICIES:
            raise BudgetError(f"{name}: unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}.")
        self.name = name
        self.budget = budget
        self.policy = policy
        self.hot = set(hot)
        self._entries: OrderedDict[Key, CacheEntry] = OrderedDict()  # recency order, oldest first
        self._freq: dict[Key, int] = {}
        self.used = 0
        self.peak = 0  # most bytes ever held (the tests check it against the budget)
        self.evictions = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Key]:
        return list(self._entries)

    @property
    def enabled(self) -> bool:
        return self.budget is None or self.budget > 0

    def get(self, key: Key, *, touch: bool = True) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if touch:
            self._entries.move_to_end(key)
            self._freq[key] = self._freq.get(key, 0) + 1
        return entry.value

    def pin(self, key: Key) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def pop(self, key: Key) -> Any | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.used -= entry.nbytes
        return entry.value

    def _victim(self) -> Key | None:
        candidates = [k for k, e in self._entries.items() if e.pins == 0]
        if not candidates:
            return None
        if self.policy == "lfu":
            # min frequency; candidates are in recency order so the first minimum is the least recent
            return min(candidates, key=lambda k: self._freq.get(k, 0))
        if self.policy == "pinned-hot":
            cold = [k for k in candidates if k not in self.hot]
            return (cold or candidates)[0]
        return candidates[0]

    def put(self, key: Key, value: Any, nbytes: int) -> tuple[bool, list[tuple[Key, Any]]]:
        """Insert, evicting as the policy says. Returns ``(stored, evicted [(key, value)])``.

        Nothing is evicted when the entry cannot fit anyway (too big, or the rest is pinned).
        """
        if not self.enabled or (self.budget is not None and nbytes > self.budget):
            return False, []
        if key in self._entries:
            self.pop(key)
        if self.budget is not None:
            evictable = sum(e.nbytes for e in self._entries.values() if e.pins == 0)
            if self.used - evictable + nbytes > self.budget:
                return False, []
        evicted = []
        while self.budget is not None and self.used + nbytes > self.budget:
            victim = self._victim()
            assert victim is not None  # guaranteed by the evictable check above
            evicted.append((victim, self.pop(victim)))
            self.evictions += 1
        self._entries[key] = CacheEntry(value, nbytes)
        self._freq[key] = self._freq.get(key, 0) + 1
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True, evicted
