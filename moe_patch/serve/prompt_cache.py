"""The keys and values of recent sequences, so that a request whose prompt begins like one of them skips that part
of its prefill.

A chat turn resends the whole conversation: without this, every turn runs the model over the history again, which
with offloaded experts means reading experts for every token of it. When a sequence ends, its own cache (prompt
and generated tokens, as the model computed them) is kept here under its token ids; a new prompt takes the entry
with the longest common token prefix, crops it to that prefix (at most the prompt's length less one token: the last
one is run to get the next token's logits) and runs only the rest. The keys and values of a prefix do not depend on
what follows it, so the tokens are those of a fresh run (checked by the tests against ``generate()``).

Entries are bounded by bytes (``--prompt-cache``), the least recently used dropped first; an entry whose tokens are a
prefix of another's is not kept (it can offer nothing the longer one cannot).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .kv import KV, nbytes, prefix


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Entry:
    ids: tuple[int, ...]
    kv: KV
    nbytes: int


@dataclass(frozen=True)
class Hit:
    """What a prompt can reuse: the first ``tokens`` positions of a cached sequence."""

    kv: KV
    tokens: int


class PromptCache:
    """Caches of finished sequences, at most ``budget`` bytes (0: keep none). Used by the engine thread; read for
    ``/stats`` from others, hence the lock."""

    def __init__(self, budget: int):
        self.budget = budget
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    def lookup(self, ids: list[int]) -> Hit | None:
        """The longest cached prefix of ``ids`` that leaves at least one token to run, or None."""
        with self._lock:
            best, best_len = None, 0
            for key, entry in self._entries.items():
                n = min(common_prefix(entry.ids, ids), len(ids) - 1)
                if n > best_len:
                    best, best_len = key, n
            if best is None:
                return None
            self._entries.move_to_end(best)
            return Hit(prefix(self._entries[best].kv, best_len), best_len)

    def store(self, ids: list[int], kv: KV) -> None:
        """Keep ``kv`` (one sequence's cache, ``len(ids)`` positions) under ``ids``, if it fits the budget."""
        size = nbytes(kv)
        if size > self.budget or not ids:
            return
        key = tuple(ids)
        with self._lock:
            for k, e in self._entries.items():
                if common_prefix(e.ids, key) == len(key):  # the new one is a prefix of a kept one: nothing to add
                    self._entries.move_to_end(k)
                    return
            for k in [k for k, e in self._entries.items() if common_prefix(e.ids, key) == len(e.ids)]:
                del self._entries[k]  # a prefix of the new one: superseded
            self._entries[self._next] = Entry(key, kv, size)
            self._next += 1
            while sum(e.nbytes for e in self._entries.values()) > self.budget:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def to_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "tokens": sum(len(e.ids) for e in self._entries.values()),
                "bytes": sum(e.nbytes for e in self._entries.values()),
                "budget_bytes": self.budget,
            }
