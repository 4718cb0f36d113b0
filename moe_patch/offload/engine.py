"""The offload engine: serves expert weights to the forward from device slots -> host cache -> source.

Per MoE layer the offloaded forward calls :meth:`OffloadEngine.dispatch` with the layer's routing. It
makes one host transfer (this layer's expert counts, with the next layer's predicted counts appended),
does the layer's bookkeeping with a few tensor operations, computes every expert already cached with
one grouped GEMM over slot indices, and only then works through the misses one by one (their reads
were queued first, so they overlap that GEMM). ModuleList experts, which their block calls one at a
time, go through :meth:`run_expert` between :meth:`begin_layer` and :meth:`end_layer`.

Tiers and their invariants:

- *device slots* (``expert_cache`` bytes, :mod:`.slab`): experts ready on ``device``, ``N = budget //
  bytes per expert`` fixed slots per expert layout. Compute-ready experts (the model dtype, decoded)
  live in preallocated ``[N, ...]`` slabs; experts kept stored or quantized (decoded at each use) are
  objects beside the slot table. Hard budget: the slots are all there is.
- *host cache* (``host_cache`` bytes, pinned on CUDA): experts in host RAM in their stored bytes,
  inclusive of the device slots. On a CPU-only run the device slots already are host RAM: when both
  tiers would hold the same bytes, the host budget simply adds slots (one RAM tier, nothing is ever
  copied from one RAM tier to another to compute it); the host tier exists there only to keep the
  compact stored copy of experts the slots hold decoded.
- *source*: the checkpoint's safetensors (or the model's own RAM for ``patch_model``).

Background work (prefetch of the next layer's likely experts, early reads of this layer's misses) runs
on reader threads; on CUDA its copies go on a side stream, ordered against the compute stream with
events per slot. Background inserts never evict the experts of the layer being computed; an error in
a background read is re-raised by the forward that needs the expert (never zeros).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from ..dispatch.core import dispatch_combine, grouped_mm_supported
from ..dispatch.experts import bank_dispatch, grouped_dispatch_on_device
from ..errors import BudgetError
from ..sizes import format_bytes
from ..validation import check_summary, routing_summary
from .cache import Key, TierCache
from .costmodel import Bandwidths, expert_flops_per_row, prefer_cpu
from ..formats import FORMATS, StoredTensor, materialize, nbytes_of, tensors_of
from .layers import OffloadLayer
from .pool import SlotPool, aligned
from .slab import SlotTable, TensorSlab
from .sources import ExpertSource
from .stats import LayerStats, OffloadStats


@dataclass
class ExpertWeights:
    """One expert's tensors as a tier holds them (possibly quantized or stored), with its size."""

    tensors: dict[str, torch.Tensor | StoredTensor]
    nbytes: int
    ready: Any = None  # CUDA event recorded after an async copy; None when usable at once
    tier: str = "disk"  # where it was read from the last time it entered the device tier
    slot: Any = None  # the pool slot holding the tensors (returned to the pool when this entry dies)
    moved: int = 0  # bytes moved to bring it into the device tier (stored bytes for quantized experts)


def encoded_nbytes(layer: OffloadLayer, kind: str) -> int:
    """Bytes one expert of ``layer`` takes once the caches encode it in the cache format ``kind``."""
    fmt = FORMATS[kind]
    return sum(fmt.encoded_nbytes(s, layer.dtype) if len(s) == 2 else math.prod(s) * layer.dtype.itemsize
               for s in layer.shapes.values())


def default_io_threads() -> int:
    """Reader threads: they only wait on the disk (stored bytes go straight into their slots), but on a
    2-core machine a second one steals compute from the forward; one per two cores, at most two."""
    return max(1, min(2, (os.cpu_count() or 2) // 2))


@dataclass
class EngineConfig:
    device: torch.device
    expert_cache: int | None
    host_cache: int | None
    policy: str = "lru"
    hot: tuple[Key, ...] = ()
    quantize: str | None = None
    prefetch: bool = True
    cpu_compute: str = "auto"  # "auto" (cost model), "always", "never"
    max_prefetch_per_layer: int | None = None
    bandwidths: Bandwidths | None = None
    io_threads: int | None = None  # None: default_io_threads()
    # for stored checkpoints: device entries "stored" (decoded per use) or "dequantized" (decoded on insert)
    device_format: str = "dequantized"
    # CPU: the dtype compute-ready slots keep experts in when it is not the model's (fp32 for bf16 models on
    # CPUs where an fp32 GEMV beats a bf16 one; chosen by the cost model at attach)
    compute_dtype: torch.dtype | None = None


@dataclass
class _Group:
    """The layers that share one device layout, their slot table and slab (or object slots)."""

    layers: list[int]
    table: SlotTable
    slab: TensorSlab | None  # compute-ready slots; None: object slots (stored / quantized entries)
    objects: list[ExpertWeights | None]


class DeviceTier:
    """The device slots of every layout group, seen as one cache (budget, peak, evictions, keys)."""

    def __init__(self, groups: list[_Group], group_of: dict[int, _Group], budget: int | None):
        self.groups, self.group_of, self.budget = groups, group_of, budget

    def __contains__(self, key: Key) -> bool:
        return key in self.group_of[key[0]].table

    def __len__(self) -> int:
        return sum(len(g.table) for g in self.groups)

    def keys(self) -> list[Key]:
        return [k for g in self.groups for k in g.table.keys()]

    @property
    def used(self) -> int:
        return sum(g.table.used for g in self.groups)

    @property
    def peak(self) -> int:
        return sum(g.table.peak for g in self.groups)

    @property
    def evictions(self) -> int:
        return sum(g.table.evictions for g in self.groups)

    def nbytes(self, key: Key) -> int:
        """Bytes the entry of ``key`` holds (its slot size)."""
        return self.group_of[key[0]].table.slot_bytes

    @property
    def capacity(self) -> int:
        return sum(g.table.capacity for g in self.groups)


class OffloadEngine:
    def __init__(self, layers: list[OffloadLayer], source: ExpertSource, config: EngineConfig):
        self.layers = layers
        self.source = source
        self.cfg = config
        self.device = config.device
        self.on_cuda = self.device.type == "cuda"
        self.stored = bool(getattr(source, "stored", False))
        # device slots hold the model's tensors (one grouped GEMM per layer) unless experts stay stored
        # or quantized there; decoded device entries are a different object from the host's stored copy
        self.compute_ready = config.quantize is None and (not self.stored or config.device_format == "dequantized")
        self.slot_dtype = config.compute_dtype if self.compute_ready else None
        converts = self.slot_dtype is not None and self.slot_dtype != layers[0].dtype
        self.decode_on_insert = (self.stored or converts) and self.compute_ready
        # CPU: one RAM tier unless the host keeps the compact stored copy of decoded slots
        self.merged = not self.on_cuda and not self.decode_on_insert
        self.io_threads = config.io_threads or default_io_threads()
        host_budget = 0 if self.merged else config.host_cache
        self.host = TierCache(host_budget, "lru", name="host_cache")
        self._lock = threading.RLock()
        self._inflight: dict[Key, Future] = {}
        self._worker = (ThreadPoolExecutor(self.io_threads, thread_name_prefix="moe-patch-prefetch")
                        if config.prefetch else None)
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None  # pragma: no cover - GPU only
        self._protected: set[Key] = set()
        self._predicted: dict[int, set[int]] = {}
        self._active: dict[int, dict[int, int]] = {}
        self._reading, self._busy_since = 0, 0.0  # reads in flight, start of the current busy period
        self._copying: deque[tuple[Any, ExpertWeights]] = deque()  # (CUDA event, host source) in flight
        self._slot_ready: dict[tuple[int, int], Any] = {}  # (group, slot) -> event of the copy filling it
        self._compute_done: Any = None  # CUDA event after the last compute that read device slots
        self._arrived: dict[Key, str] = {}  # loaded by a reader after its layer began: the tier it came from
        self._flops = {layer.index: expert_flops_per_row(layer.shapes) for layer in layers}
        self._banks: dict[int, Any] = {}
        self.phase = "prefill"
        self.stats = OffloadStats(
            layers=[LayerStats(layer.num_experts) for layer in layers],
            device=self.device.type,
            expert_bytes=max(layer.expert_bytes for layer in layers),
            bandwidths=config.bandwidths,
            stored_expert_bytes=max(self._source_bytes(layer) for layer in layers),
            device_format=(config.device_format if self.stored else None),
            compute_dtype=str(self.slot_dtype).removeprefix("torch.") if converts else None,
        )
        self.dev = self._make_device_tier()
        self.pool = self._make_pool()
        self.closed = False
        self.bypass_caches = False  # full-precision reads straight from the source (quantization error)

    # -- construction ------------------------------------------------------------------------
    def _source_bytes(self, layer: OffloadLayer) -> int:
        """Bytes one expert of ``layer`` takes as read from the source (stored bytes when quantized)."""
        nbytes = getattr(self.source, "nbytes", None)
        return nbytes(layer.index, 0) if nbytes is not None else layer.expert_bytes

    def _entry_bytes(self, layer: OffloadLayer) -> int:
        """Bytes of one device-tier entry of ``layer``."""
        if self.compute_ready:
            return TensorSlab.nbytes_per_slot(layer.shapes, self.slot_dtype or layer.dtype)
        if self.cfg.quantize:
            return encoded_nbytes(layer, self.cfg.quantize)
        return self._source_bytes(layer)

    def _make_device_tier(self) -> DeviceTier:
        cfg = self.cfg
        budget = cfg.expert_cache
        if self.merged and budget is not None:
            budget = None if cfg.host_cache is None else budget + cfg.host_cache
        signatures: dict[Any, list[OffloadLayer]] = {}
        for layer in self.layers:
            sig = (tuple(sorted(layer.shapes.items())), layer.dtype, layer.num_experts, self._entry_bytes(layer))
            signatures.setdefault(sig, []).append(layer)
        totals = {sig: len(ls) * ls[0].num_experts * sig[3] for sig, ls in signatures.items()}
        groups, group_of = [], {}
        for sig, members in signatures.items():
            slot_bytes = sig[3]
            n_experts = len(members) * members[0].num_experts
            share = None if budget is None else int(budget * totals[sig] / sum(totals.values()))
            capacity = n_experts if share is None else max(1, min(n_experts, share // slot_bytes))
            table = SlotTable([m.index for m in members], members[0].num_experts, capacity, slot_bytes,
                              policy=cfg.policy, hot=cfg.hot, budget=share)
            slab = self._allocate_slab(members[0], capacity) if self.compute_ready else None
            group = _Group([m.index for m in members], table, slab, [None] * capacity)
            groups.append(group)
            group_of.update({m.index: group for m in members})
        return DeviceTier(groups, group_of, budget)

    def _allocate_slab(self, layer: OffloadLayer, capacity: int) -> TensorSlab:
        """The slots of one layout, allocated up front (on CUDA the budget is taken at attach)."""
        try:
            return TensorSlab(layer.shapes, self.slot_dtype or layer.dtype, capacity, self.device)
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            need = capacity * TensorSlab.nbytes_per_slot(layer.shapes, self.slot_dtype or layer.dtype)
            raise BudgetError(
                f"expert_cache: {capacity} expert slots ({format_bytes(need)}) do not fit in {self.device} memory "
                "next to the rest of the model; give a smaller expert_cache (e.g. what `moe-patch inspect --gpu` "
                "plans)."
            ) from exc

    def _make_pool(self) -> SlotPool | None:
        """Host slots for reads that do not go straight into a device slot, when the budgets are finite:
        the host tier (CUDA; CPU with decoded slots) or the object slots of a merged CPU tier."""
        if self.cfg.quantize or not hasattr(self.source, "read_into"):
            return None
        if self.merged and self.compute_ready:
            return None  # reads land in their slab slot directly
        held = self.dev.budget if self.merged else self.host.budget
        if held is None:
            return None
        slot_bytes = getattr(self.source, "slot_bytes", None)
        slot = max(slot_bytes(layer.index) if slot_bytes is not None else
                   sum(aligned(math.prod(s) * torch.empty((), dtype=layer.dtype).element_size())
                       for s in layer.shapes.values()) for layer in self.layers)
        # the held experts, plus one read in flight on each thread and one refused insert
        return SlotPool(slot, held // max(slot, 1) + self.io_threads + 2, pin=self.on_cuda)

    # -- reading -------------------------------------------------------------------------------
    def _read(self, key: Key, out: dict[str, torch.Tensor] | None = None) -> ExpertWeights:
        """Read one expert from the source (no lock held: this is the slow part): into the device-slot
        views ``out`` (compute-ready, on CPU), else into a pool slot as stored."""
        slot = None if out is not None else self._take_slot()
        with self._lock:
            if self._reading == 0:
                self._busy_since = time.perf_counter()
            self._reading += 1
        try:
            if out is not None:
                self.source.read_to(*key, out)
                tensors: dict[str, Any] = dict(out)
            elif self.cfg.quantize:  # quantized from the model's dtype
                tensors = self.source.read(*key)
            else:
                read_into = getattr(self.source, "read_into", None)
                tensors = read_into(*key, slot) if read_into is not None else self.source.read(*key)
        finally:
            with self._lock:
                self._reading -= 1
                # wall time with any read in flight: with several I/O threads, summing each read's
                # duration would count overlapping time twice and halve the measured bandwidth
                busy = time.perf_counter() - self._busy_since if self._reading == 0 else 0.0
        raw = self.source.nbytes(*key) if hasattr(self.source, "nbytes") else sum(
            nbytes_of(t) for t in tensors.values())
        if self.cfg.quantize:
            tensors = {n: FORMATS[self.cfg.quantize].encode(t) for n, t in tensors.items()}
        if self.on_cuda and slot is None and out is None:  # pragma: no cover - GPU only
            tensors = {n: t.pin_memory() for n, t in tensors.items()}
        with self._lock:
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
        while slot is None and self._reap(wait_oldest=True):  # pragma: no cover - GPU only
            slot = self.pool.take()
        return slot

    def _reap(self, wait_oldest: bool = False) -> bool:
        """Let go of host copies whose device copy has finished (their slots return to the pool)."""
        with self._lock:
            if not self._copying:
                return False
            event = self._copying.popleft()[0] if wait_oldest else None  # pragma: no cover - GPU only
            while self._copying and self._copying[0][0].query():  # pragma: no cover - GPU only
                self._copying.popleft()
        if event is not None:  # pragma: no cover - GPU only
            event.synchronize()
        return True

    # -- the device slots --------------------------------------------------------------------------
    def _fill_slot(self, group: _Group, slot: int, key: Key, host: ExpertWeights | None, background: bool) -> None:
        """Write expert ``key`` into ``slot``: from the host entry (copied, and decoded when the slots hold
        decoded experts) or, with ``host`` None on a merged CPU tier, read from the source straight into
        the slot. Called without the lock; the slot is reserved (pinned) by the caller."""
        if group.slab is None:  # object slots: the entry itself (moved to the device on CUDA)
            group.objects[slot] = host if not self.on_cuda else self._to_device_object(host, background)
            return
        views = group.slab.view(slot)
        if host is None:
            self._read(key, out=views)
            return
        if not self.on_cuda:
            for n, t in host.tensors.items():
                if isinstance(t, StoredTensor):
                    t.dequantize(out=views[n].t() if t.layout.transpose else views[n])
                else:
                    views[n].copy_(t)
            return
        stream = self._stream if background else torch.cuda.current_stream(self.device)  # pragma: no cover
        busy = self._compute_done if background else None  # pragma: no cover - GPU only
        with torch.cuda.stream(stream):  # pragma: no cover - GPU only
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
        with self._lock:  # pragma: no cover - GPU only
            self._slot_ready[(id(group), slot)] = event
            if host.slot is not None:
                # Torch does not track views of our pool buffer: the host entry (and its slot) must
                # outlive the asynchronous copy even if the host cache drops it. Released by _reap.
                self._copying.append((event, host))
        self._reap()  # pragma: no cover - GPU only

    def _to_device_object(self, host: ExpertWeights, background: bool) -> ExpertWeights:  # pragma: no cover
        stream = self._stream if background else torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            tensors = {n: t.to(self.device, non_blocking=True) for n, t in host.tensors.items()}
            event = torch.cuda.Event()
            event.record(stream)
        if host.slot is not None:
            self._reap()
            with self._lock:
                self._copying.append((event, host))
        return ExpertWeights(tensors, host.nbytes, ready=event, tier=host.tier, moved=host.moved)

    def _insert(self, key: Key, host: ExpertWeights | None, background: bool) -> int | None:
        """Bring ``key`` into a device slot (evicting by policy, never a pinned slot). Returns the slot,
        left pinned for the caller, or None when every slot is pinned (the caller then computes from
        ``host``)."""
        group = self.dev.group_of[key[0]]
        with self._lock:
            slot = group.table.slot(key)
            if slot >= 0:
                group.table.pin(torch.tensor([slot]))
                return slot
            if background:  # never evict what the current layer is about to use
                protected = [group.table.slot(k) for k in self._protected if k in group.table]
                guard = torch.tensor([s for s in protected if s >= 0], dtype=torch.int64)
                group.table.pin(guard)
            try:
                slot = group.table.victim(key)
            finally:
                if background:
                    group.table.unpin(guard)
            if slot is None:
                return None
            group.table.release(slot)
            if group.slab is None:
                group.objects[slot] = None
            group.table.pin(torch.tensor([slot]))
            self._slot_ready.pop((id(group), slot), None)
        try:
            self._fill_slot(group, slot, key, host, background)
        except BaseException:
            with self._lock:
                group.table.unpin(torch.tensor([slot]))
            raise
        with self._lock:
            group.table.assign(slot, key)
        return slot

    def _entry(self, group: _Group, slot: int) -> dict[str, Any]:
        """The weights in ``slot`` as the compute takes them (views of the slab, or the object's tensors)."""
        if group.slab is not None:
            return group.slab.view(slot)
        return group.objects[slot].tensors

    def _wait_slot(self, group: _Group, slot: int) -> None:
        event = self._slot_ready.pop((id(group), slot), None) if self.on_cuda else None
        if event is not None:  # pragma: no cover - GPU only
            torch.cuda.current_stream(self.device).wait_event(event)
        if group.slab is None and self.on_cuda:  # pragma: no cover - GPU only
            entry = group.objects[slot]
            if entry is not None and entry.ready is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(entry.ready)
                for t in entry.tensors.values():
                    for part in tensors_of(t):
                        part.record_stream(stream)
                entry.ready = None

    # -- loading -----------------------------------------------------------------------------
    def _host_copy(self, key: Key) -> tuple[ExpertWeights | None, str]:
        """The host tier's entry for ``key`` or None (the caller reads it), and the tier it counts in."""
        with self._lock:
            entry = self.host.get(key)
        return entry, "host"

    def _load(self, key: Key, background: bool) -> tuple[int | None, ExpertWeights | None, str, int]:
        """Bring ``key`` into a device slot: ``(slot or None, host entry, source tier, bytes moved)``."""
        host, tier = self._host_copy(key)
        if host is None and self.merged and self.compute_ready:
            slot = self._insert(key, None, background)  # straight from the source into the slot
            if slot is not None:
                return slot, None, self.source.tier, self._source_bytes(self.layers[key[0]])
        if host is None:
            host = self._read(key)
            tier = host.tier
            with self._lock:
                if self.host.enabled and key not in self.host:
                    self.host.put(key, host, host.nbytes)
        moved = host.nbytes if tier == "host" else host.moved
        return self._insert(key, host, background), host, tier, moved

    def _background_load(self, key: Key) -> str:
        try:
            with self._lock:
                if key in self.dev:
                    return "device"
            slot, _, tier, _ = self._load(key, background=True)
            if slot is not None:
                with self._lock:
                    self.dev.group_of[key[0]].table.unpin(torch.tensor([slot]))
                    self._arrived[key] = tier
            return tier
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _submit(self, key: Key, cached: bool | None = None) -> None:
        """Queue a background read unless cached or queued (call with the lock held)."""
        if self._worker is None or key in self._inflight or (key in self.dev if cached is None else cached):
            return
        self._inflight[key] = self._worker.submit(self._background_load, key)

    # -- the forward's side: a whole layer -------------------------------------------------------
    def dispatch(self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 *, weight_inputs: bool = False, checked_by: torch.nn.Module | None = None) -> torch.Tensor:
        """The routed experts of ``layer`` on ``x [T, H]``: every cached expert in one grouped GEMM over
        slot indices, then the misses. One host transfer per layer, which also carries the routing check
        of ``checked_by`` (the experts module: bad routing raises :class:`RoutingError` naming it)."""
        spec = self.layers[layer]
        E = spec.num_experts
        summary = routing_summary(checked_by, top_k_index, top_k_weights) if checked_by is not None else None
        if self.bypass_caches:
            return dispatch_combine(x, top_k_index, top_k_weights, E, lambda e, rows: spec.compute_expert(
                e, rows, {n: t.to(rows.device) for n, t in self.source.read(layer, e).items()}),
                weight_inputs=weight_inputs)
        counts = expert_counts(top_k_index, E).to(torch.float64)
        predicted = self._predict_counts(layer + 1, x) if self._prefetching(layer + 1) else None
        parts = [counts] + ([predicted.to(torch.float64)] if predicted is not None else [])
        parts += [summary] if summary is not None else []
        host = torch.cat(parts).cpu()  # the layer's one host transfer
        if summary is not None:
            check_summary(checked_by, host[-3:].tolist(), E)
        counts_h = host[:E].to(torch.int64)
        active = counts_h.nonzero().flatten()
        group = self.dev.group_of[layer]
        table = group.table
        st = self.stats.layers[layer]
        with self._lock:
            slots = table.lookup(layer, active)
            hit = slots >= 0
            hit_experts, hit_slots = active[hit], slots[hit]
            table.touch(layer, hit_experts, hit_slots)
            table.pin(hit_slots)
            # the one conversion to Python of this layer's bookkeeping (CPU tensors: no device sync)
            routed, cached, rows, slot_of = torch.stack([active, hit.to(torch.int64), counts_h[active], slots]).tolist()
            misses = [e for e, c in zip(routed, cached) if not c]
            held = [s for s, c in zip(slot_of, cached) if c]
            span = (min(held), max(held) + 1) if held else (0, 0)
            self._protected = {(layer, e) for e in routed}
            self._arrived = {}
            st.add_slots(counts_h)
            n_hits = len(routed) - len(misses)
            st.hits["device"] += n_hits
            self.stats.bytes_read[self.phase]["device"] += n_hits * table.slot_bytes
            actual = set(routed)
            self._evaluate_prediction(layer, actual)
            self._cancel_unneeded(layer, actual)
            # early reads of the misses overlap the grouped GEMM of the hits; misses the CPU may compute
            # from host RAM are left to _acquire's cost model (an early copy would pre-empt it)
            rows_of = dict(zip(routed, rows))
            early = [e for e in misses if not self._cpu_candidate((layer, e), rows_of[e])]
            for e in early[: max(0, table.capacity - n_hits)]:
                self._submit((layer, e), cached=False)
            if predicted is not None:
                self._prefetch(layer + 1, host[E:E + predicted.numel()].to(torch.int64))
        try:
            out = self._compute_slots(spec, group, x, top_k_index, top_k_weights, hit_experts, hit_slots, span,
                                      weight_inputs)
        finally:
            self._unpin(table, hit_slots)
        if misses:
            keep = torch.zeros(E + 1, dtype=torch.bool)
            keep[misses] = True
            miss_index = torch.where(self._to_routing(keep, top_k_index)[top_k_index.clamp(0, E)], top_k_index,
                                     torch.full_like(top_k_index, E))
            out = out + dispatch_combine(
                x, miss_index, top_k_weights, E, lambda e, rows: self._run(layer, e, rows), weight_inputs=weight_inputs)
        with self._lock:
            self._protected = set()
        return out

    def _compute_slots(self, spec: OffloadLayer, group: _Group, x: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, experts: torch.Tensor, slots: torch.Tensor,
                       span: tuple[int, int], weight_inputs: bool) -> torch.Tensor:
        """The cached experts of a layer: one grouped GEMM over slot indices (compute-ready slabs), or each
        entry decoded and computed (stored / quantized object slots)."""
        E = spec.num_experts
        if experts.numel() == 0:
            return torch.zeros(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
        if self.on_cuda or group.slab is None:  # pragma: no branch - only pending copies or objects need it
            for s in slots.tolist():
                self._wait_slot(group, s)
        grad = torch.is_grad_enabled() and x.requires_grad
        if group.slab is None or grad:
            # one expert at a time; under autograd on owned copies (slots are recycled after this layer)
            by_expert = dict(zip(experts.tolist(), slots.tolist()))
            keep = torch.full((E + 1,), E, dtype=torch.int64)
            keep[experts] = experts
            index = self._to_routing(keep, top_k_index)[top_k_index.clamp(0, E)]

            def one(e: int, rows: torch.Tensor) -> torch.Tensor:
                weights = {n: materialize(t) for n, t in self._entry(group, by_expert[e]).items()}
                if grad:
                    weights = {n: t.clone() for n, t in weights.items()}
                return spec.compute_expert(e, rows, weights)

            return dispatch_combine(x, index, top_k_weights, E, one, weight_inputs=weight_inputs)
        # the grouped GEMM runs over the slot range holding this layer's cached experts only (with every
        # expert at home, exactly the layer's own experts): slots outside it are neither read nor looped over
        lo, hi = span
        remap = torch.full((E + 1,), hi - lo, dtype=torch.int64)  # not cached (or dropped): past the range
        remap[experts] = slots - lo
        slot_index = self._to_routing(remap, top_k_index)[top_k_index.clamp(0, E)]
        bank = self._bank(spec, group, lo, hi)
        if self.on_cuda and grouped_mm_supported(x, bank.kernel_operands()):  # pragma: no cover - GPU only
            return grouped_dispatch_on_device(bank, x, slot_index, top_k_weights, weight_inputs=weight_inputs)
        # the CPU, or operands the kernel refuses (odd widths, float64): the path that checks and falls back
        return bank_dispatch(bank, x, slot_index, top_k_weights, weight_inputs=weight_inputs)

    @staticmethod
    def _to_routing(table: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """A small host-made lookup table on the routing's device. From pageable memory a host-to-device
        copy waits for the stream first (a sync); from pinned memory it is queued like the rest."""
        if top_k_index.device.type == "cpu":
            return table
        return table.pin_memory().to(top_k_index.device, non_blocking=True)  # pragma: no cover - GPU only

    def _bank(self, spec: OffloadLayer, group: _Group, lo: int, hi: int):
        key = (spec.index, lo, hi)
        bank = self._banks.get(key)
        if bank is None:
            if len(self._banks) > 4 * len(self.layers):  # ranges move with evictions: keep the recent ones
                self._banks.clear()
            bank = self._banks[key] = spec.slot_bank({n: t[lo:hi] for n, t in group.slab.tensors.items()})
        return bank

    # -- per expert: misses, and ModuleList experts ------------------------------------------------
    def _run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert that was not cached when its layer began (or a ModuleList expert)."""
        key = (layer, expert)
        spec = self.layers[layer]
        weights, release = self._acquire(key, x.shape[0])
        try:
            if torch.is_grad_enabled() and x.requires_grad:
                # Autograd keeps these for backward, but the slot is recycled after _release: own copies keep
                # gradients w.r.t. the input exact (the experts themselves are frozen).
                weights = {n: t.clone() for n, t in weights.items()}
            if release[0] == "cpu" and x.device.type != "cpu":  # pragma: no cover - GPU only
                return spec.compute_expert(expert, x.to("cpu"), weights).to(x.device)
            return spec.compute_expert(expert, x, weights)
        finally:
            self._release(key, release)

    def _acquire(self, key: Key, rows: int) -> tuple[dict[str, torch.Tensor], tuple]:
        """The decoded weights of ``key`` and how to release them: from its device slot (loaded now if
        needed), or computed on the CPU from host RAM when the cost model says so."""
        st = self.stats.layers[key[0]]
        group = self.dev.group_of[key[0]]
        with self._lock:
            slot = group.table.slot(key)
            if slot >= 0:  # cached after the layer began: an early read that arrived, or a ModuleList hit
                group.table.pin(torch.tensor([slot]))
                tier = self._arrived.pop(key, "device")
                st.hits[tier] += 1
                self.stats.bytes_read[self.phase][tier] += (group.table.slot_bytes if tier == "device"
                                                            else self._source_bytes(self.layers[key[0]]))
                return self._slot_weights(group, slot), ("slot", group, slot)
            fut = self._inflight.get(key)
            if fut is None and self._cpu_candidate(key, rows):
                # Decided and pinned under one lock: the worker cannot evict it in between.
                host = self.host.get(key)
                self.host.pin(key)
                st.hits["host"] += 1
                st.cpu_computed += 1
                self.stats.bytes_read[self.phase]["host"] += host.nbytes
                self.stats.cpu_bytes[self.phase] += host.nbytes
                return {n: materialize(t) for n, t in host.tensors.items()}, ("cpu", key)
        t0 = time.perf_counter()
        tier = None
        if fut is not None:
            tier = fut.result()  # re-raises a background read error
            with self._lock:
                slot = group.table.slot(key)
                if slot >= 0:
                    group.table.pin(torch.tensor([slot]))
                    tier = self._arrived.pop(key, tier if tier != "device" else "device")
                    self._account(st, key, tier, t0, group)
                    return self._slot_weights(group, slot), ("slot", group, slot)
        slot, host, tier, moved = self._load(key, background=False)
        with self._lock:
            self._account(st, key, tier, t0, group, moved)
        if slot is not None:
            return self._slot_weights(group, slot), ("slot", group, slot)
        # every slot is pinned by this layer (a budget below its active experts): compute from the read
        return {n: materialize(t.to(self.device) if self.on_cuda else t) for n, t in host.tensors.items()}, ("none",)

    def _account(self, st: LayerStats, key: Key, tier: str, t0: float, group: _Group, moved: int | None = None) -> None:
        self.stats.stall_s += time.perf_counter() - t0
        st.hits[tier] += 1
        nbytes = group.table.slot_bytes if tier == "device" else (
            moved if moved is not None else self._source_bytes(self.layers[key[0]]))
        self.stats.bytes_read[self.phase][tier] += nbytes

    def _slot_weights(self, group: _Group, slot: int) -> dict[str, torch.Tensor]:
        self._wait_slot(group, slot)
        return {n: materialize(t) for n, t in self._entry(group, slot).items()}

    def _release(self, key: Key, how: tuple) -> None:
        if how[0] == "slot":
            self._unpin(how[1].table, torch.tensor([how[2]]))
        elif how[0] == "cpu":
            with self._lock:
                self.host.unpin(key)

    def _unpin(self, table: SlotTable, slots: torch.Tensor) -> None:
        """Slots the forward is done with may be refilled; on CUDA only once its queued kernels ran."""
        if self.on_cuda:  # pragma: no cover - GPU only
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            if self.on_cuda:  # pragma: no cover - GPU only
                self._compute_done = event
            table.unpin(slots)

    def _cpu_candidate(self, key: Key, rows: int) -> bool:
        """The miss is in host RAM and should be computed there (caller holds the lock): on CUDA when
        the cost model says so, on a CPU-only run only on request ("always")."""
        allowed = self.cfg.cpu_compute != "never" if self.on_cuda else self.cfg.cpu_compute == "always"
        if not allowed or key not in self.host:
            return False
        if self.cfg.cpu_compute == "always":
            return True
        bw = self.cfg.bandwidths
        host = self.host.get(key, touch=False)
        return bw is not None and prefer_cpu(rows, host.nbytes, self._flops[key[0]], bw)

    # -- ModuleList blocks: their own loop calls each expert ---------------------------------------
    def begin_layer(self, layer: int, hidden: torch.Tensor) -> None:
        """Before a ModuleList block runs its experts: prefetch the next layer (routing is learnt per call)."""
        if self.bypass_caches:
            return
        self._active[layer] = {}
        with self._lock:
            self._protected = {k for k in self.dev.keys() if k[0] == layer}
            self._arrived = {}
        if self._prefetching(layer + 1):
            predicted = self._predict_counts(layer + 1, hidden)
            if predicted is not None:
                host = predicted.cpu().to(torch.int64)
                with self._lock:
                    self._prefetch(layer + 1, host)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` of a ModuleList ``layer`` on rows ``x`` (its block calls each expert)."""
        spec = self.layers[layer]
        if self.bypass_caches:
            return spec.compute_expert(expert, x, {n: t.to(x.device) for n, t in self.source.read(layer, expert).items()})
        used = self._active.setdefault(layer, {})
        used[expert] = used.get(expert, 0) + x.shape[0]
        key = (layer, expert)
        group = self.dev.group_of[layer]
        with self._lock:
            if key in group.table:
                slot = group.table.slot(key)
                group.table.touch(layer, torch.tensor([expert]), torch.tensor([slot]))
        return self._run(layer, expert, x)

    def end_layer(self, layer: int) -> None:
        """After a ModuleList block ran: its routing is known now."""
        if self.bypass_caches:
            return
        used = self._active.pop(layer, {})
        st = self.stats.layers[layer]
        with self._lock:
            counts = torch.zeros(st.num_experts, dtype=torch.int64)
            for e, rows in used.items():
                counts[e] = rows
            st.add_slots(counts)
            self._evaluate_prediction(layer, set(used))
            self._protected = set()

    # -- prediction and prefetch -------------------------------------------------------------------
    def _prefetching(self, layer: int) -> bool:
        return self._worker is not None and layer < len(self.layers) and self.layers[layer].router is not None

    @torch.no_grad()
    def _predict_counts(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """``[E]`` counts of the experts ``layer`` will likely use: its own router on the current hidden
        state (on the device; read back with the current layer's counts, in one transfer).

        The router's ``forward`` is called directly (no hooks, so output recorders do not see it);
        routers returning ``(logits, weights, indices)`` give their exact top-k choice for this input.
        """
        spec = self.layers[layer]
        router = spec.router
        x = hidden.reshape(-1, hidden.shape[-1])
        w = getattr(router, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape[-1] != x.shape[-1]:
            return None
        if _takes_hidden_only(type(router)):
            out = type(router).forward(router, x)
        elif isinstance(w, torch.Tensor) and w.dim() == 2:
            out = torch.nn.functional.linear(x.to(w.dtype), w)  # routers needing more inputs (MiniMax-M2's bias)
        else:
            return None
        idx = None
        if isinstance(out, tuple):
            idx = out[-1] if not out[-1].is_floating_point() else None
            logits = out[0]
        else:
            logits = out
        if idx is None:
            idx = torch.topk(logits.float(), min(spec.top_k, logits.shape[-1]), dim=-1).indices
        return expert_counts(idx, spec.num_experts)

    def predict(self, layer: int, hidden: torch.Tensor) -> set[int]:
        """Experts layer ``layer`` will likely use (host-side set; one transfer)."""
        counts = self._predict_counts(layer, hidden)
        if counts is None:
            return set()
        return set(most_used(counts.cpu(), self._prefetch_limit(self.layers[layer])))

    def _prefetch(self, layer: int, counts: torch.Tensor) -> None:
        """Queue background loads of ``layer``'s most likely experts (caller holds the lock)."""
        spec = self.layers[layer]
        limit = self.cfg.max_prefetch_per_layer
        limit = self._prefetch_limit(spec) if limit is None else limit
        predicted = most_used(counts, limit)
        self._predicted[layer] = set(predicted)
        if not predicted:
            return
        # the cached ones in one lookup (no Python per expert beyond the list itself)
        cached = self.dev.group_of[layer].table.lookup(layer, torch.tensor(predicted)) >= 0
        for e, c in zip(predicted, cached.tolist()):
            if not c and (layer, e) not in self._inflight:
                self.stats.prefetch_issued += 1
                self._submit((layer, e), cached=False)

    def _prefetch_limit(self, spec: OffloadLayer) -> int:
        capacity = self.dev.group_of[spec.index].table.capacity
        # half the device slots for what the next layer may need, at least its top-k
        return max(spec.top_k, capacity // 2) if capacity < spec.num_experts * len(self.layers) else spec.num_experts

    def _cancel_unneeded(self, layer: int, actual: set[int]) -> None:
        """Drop queued (not started) prefetches of this layer's experts that its router did not pick:
        they would only delay the reads of its real misses (caller holds the lock)."""
        for key in [k for k in self._inflight if k[0] == layer and k[1] not in actual]:
            if self._inflight[key].cancel():
                del self._inflight[key]
                self.stats.prefetch_dropped += 1

    def _evaluate_prediction(self, layer: int, actual: set[int]) -> None:
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        st = self.stats.layers[layer]
        st.predicted += len(predicted)
        st.predicted_used += len(predicted & actual)
        st.used_when_predicted += len(actual)

    # -- lifecycle ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait for queued background reads (errors are left for the forward that needs them)."""
        with self._lock:
            futures = list(self._inflight.values())
        for f in futures:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - reported where the expert is used
                pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
        self.source.close()


@functools.lru_cache(maxsize=64)
def _takes_hidden_only(router_cls: type) -> bool:
    """Whether ``router_cls.forward`` can be called with the hidden states alone."""
    try:
        params = list(inspect.signature(router_cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) <= 1


def expert_counts(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` routed slots per expert (ids outside ``[0, E)``, dropped slots, are not counted). ``histc``
    sizes its output from its arguments, so on CUDA it queues without a host sync (``bincount`` syncs)."""
    flat = index.reshape(-1).to(torch.float32)
    return torch.histc(flat, bins=num_experts, min=-0.5, max=num_experts - 0.5)


def most_used(counts, limit: int) -> list[int]:
    """Indices of the ``limit`` largest non-zero counts, largest first (ties: lower index first)."""
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    order = sorted(range(len(counts)), key=lambda e: -counts[e])[:limit]
    return [e for e in order if counts[e] > 0]
