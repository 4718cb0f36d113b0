"""Reading experts from the source: into a device slot's views, or into a host pool slot as stored, with the
disk time and bytes accounted (wall time with any read in flight, so overlapping reads count once)."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from ..formats import Format, nbytes_of
from .backends import DeviceBackend
from .cache import Key
from .device_tier import ExpertWeights
from .layers import OffloadLayer
from .pool import SlotPool
from .sources import ExpertSource
from .stats import OffloadStats


def make_pool(
    source: ExpertSource,
    layers: list[OffloadLayer],
    held: int | None,
    reads_into_slab: bool,
    cache_format: Format | None,
    io_threads: int,
    pin: bool,
) -> SlotPool | None:
    """Host slots for reads that do not go straight into a device slot, when the budgets are finite (``held``:
    the bytes the host tier, or the object slots of a merged CPU tier, may keep). None when reads need no
    pool: cache-encoded experts (their encoding allocates), a source that hands out memory it already
    holds, reads landing in their slab slot, or no limit."""
    if cache_format is not None or not source.reads_into_slots or reads_into_slab or held is None:
        return None
    slot = max(source.slot_bytes(layer.index) for layer in layers)
    # the held experts, plus one read in flight on each thread and one refused insert
    return SlotPool(slot, held // max(slot, 1) + io_threads + 2, pin=pin)


class Reader:
    def __init__(
        self,
        source: ExpertSource,
        pool: SlotPool | None,
        stats: OffloadStats,
        lock: threading.RLock,
        cache_format: Format | None,
        backend: DeviceBackend,
    ):
        self.source, self.pool, self.stats, self.lock = source, pool, stats, lock
        self.cache_format, self.backend = cache_format, backend
        self._reading, self._busy_since = 0, 0.0  # reads in flight, start of the current busy period

    def read(self, key: Key, out: dict[str, torch.Tensor] | None = None) -> ExpertWeights:
        """Read one expert from the source (no lock held: this is the slow part): into the device-slot
        views ``out`` (compute-ready, on CPU), else into a pool slot as stored."""
        slot = None if out is not None else self._take_slot()
        with self.lock:
            if self._reading == 0:
                self._busy_since = time.perf_counter()
            self._reading += 1
        try:
            if out is not None:
                self.source.read_to(*key, out)
                tensors: dict[str, Any] = dict(out)
            elif self.cache_format is not None:  # encoded from the model's dtype
                tensors = self.source.read(*key)
            else:
                tensors = self.source.read_into(*key, slot)
        finally:
            with self.lock:
                self._reading -= 1
                # wall time with any read in flight: with several I/O threads, summing each read's
                # duration would count overlapping time twice and halve the measured bandwidth
                busy = time.perf_counter() - self._busy_since if self._reading == 0 else 0.0
        raw = self.source.nbytes(*key)
        if self.cache_format is not None:
            tensors = {n: self.cache_format.encode(t) for n, t in tensors.items()}
        if slot is None and out is None:
            tensors = self.backend.stage(tensors)
        with self.lock:
            if self.source.tier == "disk":
                self.stats.disk_read_s += busy
                self.stats.disk_bytes_total += raw
        nbytes = sum(nbytes_of(t) for t in tensors.values())
        return ExpertWeights(tensors, nbytes, tier=self.source.tier, slot=slot, moved=raw)

    def _take_slot(self) -> Any:
        """A free pool slot; when all are taken by copies still in flight, wait for the oldest."""
        if self.pool is None:
            return None
        slot = self.pool.take()
        while slot is None and self.backend.reap(wait_oldest=True):  # pragma: no cover - GPU only
            slot = self.pool.take()
        return slot
