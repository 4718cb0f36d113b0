"""The CUDA backend: slots in GPU memory, filled by copies (and decodes) on a side stream for background
loads or on the compute stream for demand loads, ordered by events.

- a copy records an event per slot; the compute waits for it before reading the slot (:meth:`wait_slot`);
- a background copy into a slot waits for the last compute that read device slots (``_compute_done``), so a
  recycled slot is never overwritten while a queued kernel still reads it;
- a host entry in a pool slot must outlive its asynchronous copy even if the host cache drops it: it stays in
  ``_copying`` until its event completes (:meth:`reap`) - torch does not track views of our pool buffer;
- stored (quantized) bytes cross PCIe and are decoded on the GPU into the slot; tensors made on the side
  stream are ``record_stream``-ed on the stream that uses them.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from typing import Any

import torch

from ...dispatch.core import grouped_mm_supported
from ...dispatch.experts import ExpertBank, grouped_dispatch_on_device
from ...formats import StoredTensor, tensors_of
from .cpu import CpuBackend


class CudaBackend(CpuBackend):  # pragma: no cover - GPU only (tests/offload/test_cuda.py)
    pins_host = True
    asynchronous = True

    def __init__(self, device: torch.device, lock: threading.RLock):
        super().__init__(device, lock)
        self._stream = torch.cuda.Stream(device)
        self._copying: deque[tuple[Any, Any]] = deque()  # (CUDA event, host entry) in flight
        self._slot_ready: dict[tuple[int, int], Any] = {}  # (group, slot) -> event of the copy filling it
        self._compute_done: Any = None  # CUDA event after the last compute that read device slots

    def stage(self, tensors):
        return {n: t.pin_memory() for n, t in tensors.items()}

    def fill(self, views, host, background, slot_id):
        stream = self._stream if background else torch.cuda.current_stream(self.device)
        busy = self._compute_done if background else None
        with torch.cuda.stream(stream):
            if busy is not None:
                stream.wait_event(busy)  # the compute stream is done reading whatever this slot held
            for n, t in host.tensors.items():
                if isinstance(t, StoredTensor):
                    # the stored bytes cross PCIe; decoding runs on the GPU, into the slot
                    staged = t.to(self.device, non_blocking=True)
                    staged.dequantize(out=views[n].t() if t.layout.transpose else views[n])
                    for part in staged.parts():
                        part.record_stream(stream)
                else:
                    views[n].copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        with self.lock:
            self._slot_ready[slot_id] = event
            if host.slot is not None:
                self._copying.append((event, host))
        self.reap()

    def device_object(self, host, background):
        stream = self._stream if background else torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            tensors = {n: t.to(self.device, non_blocking=True) for n, t in host.tensors.items()}
            event = torch.cuda.Event()
            event.record(stream)
        if host.slot is not None:
            self.reap()
            with self.lock:
                self._copying.append((event, host))
        return dataclasses.replace(host, tensors=tensors, ready=event, slot=None)

    def to_device(self, t):
        return t.to(self.device)

    def wait_slot(self, slot_id, entry=None):
        event = self._slot_ready.pop(slot_id, None)
        stream = torch.cuda.current_stream(self.device)
        if event is not None:
            stream.wait_event(event)
        if entry is not None and entry.ready is not None:
            stream.wait_event(entry.ready)
            for t in entry.tensors.values():
                for part in tensors_of(t):
                    part.record_stream(stream)
            entry.ready = None

    def forget_slot(self, slot_id):
        self._slot_ready.pop(slot_id, None)

    def computed(self):
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        with self.lock:
            self._compute_done = event

    def reap(self, wait_oldest=False):
        with self.lock:
            if not self._copying:
                return False
            event = self._copying.popleft()[0] if wait_oldest else None
            while self._copying and self._copying[0][0].query():
                self._copying.popleft()
        if event is not None:
            event.synchronize()
        return True

    def synchronize(self):
        torch.cuda.synchronize(self.device)

    def routing_table(self, table, top_k_index):
        # from pageable memory a host-to-device copy waits for the stream first (a sync); pinned, it is queued
        if top_k_index.device.type == "cpu":
            return table
        return table.pin_memory().to(top_k_index.device, non_blocking=True)

    def compute(self, bank: ExpertBank, x, slot_index, top_k_weights, weight_inputs):
        if grouped_mm_supported(x, bank.kernel_operands()):
            return grouped_dispatch_on_device(bank, x, slot_index, top_k_weights, weight_inputs=weight_inputs)
        # operands the kernel refuses (odd widths, float64): the path that checks and falls back
        return super().compute(bank, x, slot_index, top_k_weights, weight_inputs)
