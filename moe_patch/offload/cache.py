"""The host tier: a byte-budgeted cache of experts in host RAM, evicting by the run's :mod:`.policy`.

A :class:`TierCache` maps ``(layer, expert)`` to an entry with a size in bytes and never holds more than
its budget: an insert that cannot fit without evicting a pinned entry is refused. Entries are kept in
recency order, so LRU takes the oldest unpinned one without scoring; other policies score the candidates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .policy import POLICIES, EvictionPolicy

Key = tuple[int, int]


@dataclass
class CacheEntry:
    value: Any
    nbytes: int
    pins: int = 0
    last_used: int = 0


class TierCache:
    """One tier of the expert hierarchy, with a hard byte budget (``None``: unlimited)."""

    def __init__(
        self, budget: int | None, policy: EvictionPolicy | str = "lru", hot: Iterable[Key] = (), name: str = "cache"
    ):
        self.name = name
        self.budget = budget
        self.policy = POLICIES[policy] if isinstance(policy, str) else policy
        self.hot = set(hot)
        self._entries: OrderedDict[Key, CacheEntry] = OrderedDict()  # recency order, oldest first
        self._uses: dict[Key, int] = {}  # kept across evictions
        self._clock = 0
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

    def _touch(self, key: Key, entry: CacheEntry) -> None:
        self._clock += 1
        entry.last_used = self._clock
        self._uses[key] = self._uses.get(key, 0) + 1

    def get(self, key: Key, *, touch: bool = True) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if touch:
            self._entries.move_to_end(key)
            self._touch(key, entry)
        return entry.value

    def nbytes(self, key: Key) -> int:
        return self._entries[key].nbytes

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
        if self.policy.recency_only:
            return candidates[0]  # recency order: the oldest unpinned entry
        score = self.policy.score(
            torch.tensor([self._entries[k].last_used for k in candidates]),
            torch.tensor([self._uses.get(k, 0) for k in candidates]),
            torch.tensor([k in self.hot for k in candidates]),
            self._clock,
        )
        return candidates[int(torch.argmin(score))]  # the first minimum: the least recent among equals

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
        entry = self._entries[key] = CacheEntry(value, nbytes)
        self._touch(key, entry)
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True, evicted
