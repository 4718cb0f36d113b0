"""Fixed-size slots for cached experts, carved out of one preallocated buffer.

Experts are read straight into a free slot, so a run never returns multi-megabyte blocks to the
C allocator: glibc would otherwise keep freed 10 MB tensors in its heaps (its mmap threshold
adapts upwards) and the process RSS would drift far above the cache budget. A slot goes back to
the pool when the entry that owns it is garbage-collected (``weakref.finalize``), so lifetime
follows the caches and any forward still computing with it.

On CUDA the buffer is page-locked with ``cudaHostRegister`` on exactly its own bytes: torch's
``pin_memory=True`` goes through its caching host allocator, which rounds a block up to the next
power of two (a 20 GiB host budget would lock 32 GiB).
"""

from __future__ import annotations

import threading
import weakref

import torch

ALIGN = 64


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensors_slot_bytes(shapes, dtype: torch.dtype) -> int:
    """A slot for tensors of these shapes in ``dtype``, each starting on an aligned offset."""
    total = 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += aligned(n * torch.empty((), dtype=dtype).element_size())
    return total


class Slot:
    """One slot; hands out typed views of its bytes in order."""

    def __init__(self, pool: SlotPool, index: int):
        self.index = index
        self._base = pool.buffer.narrow(0, index * pool.slot_bytes, pool.slot_bytes)
        self._used = 0
        weakref.finalize(self, pool._release, index)

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if self._used + nbytes > self._base.numel():
            raise ValueError("slot too small for this expert")
        view = self._base.narrow(0, self._used, nbytes).view(dtype).reshape(shape)
        self._used += aligned(nbytes)
        return view


class SlotPool:
    def __init__(self, slot_bytes: int, slots: int, pin: bool = False):
        self.slot_bytes = aligned(slot_bytes)
        self.slots = slots
        # torch.empty does not touch the pages: RSS grows only as slots are first used (unpinned)
        self.buffer = torch.empty(self.slot_bytes * slots, dtype=torch.uint8)
        self.pinned = pin and _register(self.buffer)
        if self.pinned:  # pragma: no cover - GPU only
            weakref.finalize(self, _unregister, self.buffer.data_ptr())
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def take(self) -> Slot | None:
        with self._lock:
            if not self._free:
                return None
            index = self._free.pop()
        return Slot(self, index)

    def _release(self, index: int) -> None:
        with self._lock:
            self._free.append(index)

    @property
    def free(self) -> int:
        return len(self._free)


def _register(buffer: torch.Tensor) -> bool:  # pragma: no cover - GPU only
    """Page-lock ``buffer`` in place for asynchronous copies; False (pageable) if the driver refuses."""
    if buffer.numel() == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    return int(err) == 0


def _unregister(ptr: int) -> None:  # pragma: no cover - GPU only
    torch.cuda.cudart().cudaHostUnregister(ptr)
