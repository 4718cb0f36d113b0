"""The offload engine: serves expert weights to the forward from device cache -> host cache -> source.

Per MoE layer the patched forward calls :meth:`OffloadEngine.begin_layer` (statistics, prefetch of
the next layer, early reads of this layer's misses), then :meth:`OffloadEngine.run_expert` for each
active expert, then :meth:`OffloadEngine.end_layer`.

Tiers and their invariants:

- *device cache* (``expert_cache`` bytes): experts ready to compute on ``device``. On CPU it is the
  resident RAM tier. Hard budget; an insert that does not fit evicts per policy or is refused.
- *host cache* (``host_cache`` bytes, pinned on CUDA): experts in host RAM. On CUDA it is
  inclusive (a device eviction leaves the host copy); on CPU both tiers are the same memory, so it
  is exclusive (a device eviction demotes the entry, a promotion moves it: no byte is held twice).
- *source*: the checkpoint's safetensors (or the model's own RAM for ``patch_model``).

Experts of quantized checkpoints (FP8, MXFP4, compressed-tensors) are read and kept in the host
tier in their stored bytes. The device tier keeps them stored (decoded each time they are computed:
more experts per byte) or decoded once on insert (``device_format``, chosen by the cost model);
on CUDA the copy moves the stored bytes and decoding runs on the GPU after it. When device entries
are decoded copies of host entries, the tiers are inclusive on CPU too (the host keeps the compact
copy, the device tier the decoded one).

Background work (prefetch of the next layer's likely experts, early reads of this layer's misses)
runs on two reader threads; on CUDA its copies go on a side stream and the compute stream waits on
an event. Background inserts may not evict the experts of the layer being computed; if they do
not fit they are dropped, so the budgets hold whatever the prefetcher does. An error in a
background read is re-raised by the forward that needs the expert (never zeros).
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .cache import Key, TierCache
from .costmodel import Bandwidths, expert_flops_per_row, prefer_cpu
from .forwards import compute_expert
from .layers import OffloadLayer
from .pool import SlotPool, aligned
from .formats import StoredTensor
from .quant import QuantizedTensor, materialize, nbytes_of, quantize, tensors_of
from .sources import ExpertSource
from .stats import LayerStats, OffloadStats


@dataclass
class ExpertWeights:
    """One expert's tensors as a cache holds them (possibly quantized), with its size."""

    tensors: dict[str, torch.Tensor | QuantizedTensor]
    nbytes: int
    ready: Any = None  # CUDA event recorded after an async copy; None when usable at once
    tier: str = "disk"  # where it was read from the last time it entered the device cache
    slot: Any = None  # the pool slot holding the tensors (returned to the pool when this entry dies)
    moved: int = 0  # bytes moved to bring it into the device cache (stored bytes for quantized experts)


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
    # two readers: one casts or copies while the other waits on the disk (bench/offload.py on the 2-core VM:
    # stall 0.19 -> 0.03 s, decode 5.1 -> 5.5 tok/s; a third did not help)
    io_threads: int = 2
    # for quantized checkpoints: device-cache entries "stored" (decoded per use) or "dequantized" (on insert)
    device_format: str = "dequantized"


class OffloadEngine:
    def __init__(self, layers: list[OffloadLayer], source: ExpertSource, config: EngineConfig):
        self.layers = layers
        self.source = source
        self.cfg = config
        self.device = config.device
        self.on_cuda = self.device.type == "cuda"
        self.stored = bool(getattr(source, "stored", False))
        # device entries decoded from the host's stored bytes: a different object, so the tiers are inclusive
        self.decode_on_insert = self.stored and config.device_format == "dequantized"
        self.exclusive = not self.on_cuda and not self.decode_on_insert
        self.dev = TierCache(config.expert_cache, config.policy, config.hot, name="expert_cache")
        self.host = TierCache(config.host_cache, "lru", name="host_cache")
        self._lock = threading.RLock()
        self._inflight: dict[Key, Future] = {}
        self._worker = (ThreadPoolExecutor(config.io_threads, thread_name_prefix="moe-patch-prefetch")
                        if config.prefetch else None)
        self._stream = torch.cuda.Stream(self.device) if self.on_cuda else None  # pragma: no cover - GPU only
        self._protected: set[Key] = set()
        self._predicted: dict[int, set[int]] = {}
        self._active: dict[int, dict[int, int]] = {}
        self._resident: set[Key] = set()  # this layer's experts already in the device cache at its start
        self._reading, self._busy_since = 0, 0.0  # reads in flight, start of the current busy period
        self._copying: deque[tuple[Any, ExpertWeights]] = deque()  # (CUDA event, host source) in flight
        self._flops = {layer.index: expert_flops_per_row(layer.shapes) for layer in layers}
        self.phase = "prefill"
        self.stats = OffloadStats(
            layers=[LayerStats(layer.num_experts) for layer in layers],
            device=self.device.type,
            expert_bytes=max(layer.expert_bytes for layer in layers),
            bandwidths=config.bandwidths,
            stored_expert_bytes=max(self._source_bytes(layer) for layer in layers),
            device_format=(config.device_format if self.stored else None),
        )
        self.pool = self._make_pool()
        self.dev_pool = self._make_device_pool()
        self.closed = False
        self.bypass_caches = False  # full-precision reads straight from the source (quantization error)

    # -- loading -----------------------------------------------------------------------------
    def _source_bytes(self, layer: OffloadLayer) -> int:
        """Bytes one expert of ``layer`` takes as read from the source (stored bytes when quantized)."""
        nbytes = getattr(self.source, "nbytes", None)
        return nbytes(layer.index, 0) if nbytes is not None else layer.expert_bytes

    def _make_pool(self) -> SlotPool | None:
        """Host slots for the RAM tiers when budgets are finite and experts are read as stored or unquantized."""
        if self.cfg.quantize or not hasattr(self.source, "read_into"):
            return None
        ram_budgets = [self.host.budget] if not self.exclusive else [self.dev.budget, self.host.budget]
        if any(b is None for b in ram_budgets):
            return None
        slot_bytes = getattr(self.source, "slot_bytes", None)
        slot = max(slot_bytes(layer.index) if slot_bytes is not None else
                   sum(aligned(math.prod(s) * torch.empty((), dtype=layer.dtype).element_size())
                       for s in layer.shapes.values()) for layer in self.layers)
        # the cached experts, plus one read in flight on each thread and one refused insert
        slots = sum(b // max(slot, 1) for b in ram_budgets) + self.cfg.io_threads + 1
        return SlotPool(slot, slots, pin=self.on_cuda)

    def _make_device_pool(self) -> SlotPool | None:
        """On CPU, slots for experts decoded on insert into the device tier (keeps RSS within its budget)."""
        if self.on_cuda or not self.decode_on_insert or self.dev.budget is None:
            return None
        slot = max(sum(aligned(math.prod(s) * torch.empty((), dtype=layer.dtype).element_size())
                       for s in layer.shapes.values()) for layer in self.layers)
        return SlotPool(slot, self.dev.budget // slot + self.cfg.io_threads + 1)

    def _read(self, key: Key) -> ExpertWeights:
        """Read one expert from the source (no lock held: this is the slow part)."""
        slot = self._take_slot()
        with self._lock:
            if self._reading == 0:
                self._busy_since = time.perf_counter()
            self._reading += 1
        try:
            read_into = getattr(self.source, "read_into", None)
            tensors: dict[str, Any] = read_into(*key, slot) if read_into is not None else self.source.read(*key)
        finally:
            with self._lock:
                self._reading -= 1
                # wall time with any read in flight: with several I/O threads, summing each read's
                # duration would count overlapping time twice and halve the measured bandwidth
                busy = time.perf_counter() - self._busy_since if self._reading == 0 else 0.0
        raw = sum(nbytes_of(t) for t in tensors.values())
        if self.cfg.quantize:
            tensors = {n: quantize(t, self.cfg.quantize) for n, t in tensors.items()}
        if self.on_cuda and slot is None:  # pragma: no cover - GPU only
            tensors = {n: t.pin_memory() for n, t in tensors.items()}
        with self._lock:
            if self.source.tier == "disk":
                self.stats.disk_read_s += busy
                self.stats.disk_bytes_total += raw
        return ExpertWeights(tensors, sum(nbytes_of(t) for t in tensors.values()), tier=self.source.tier, slot=slot)

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
            if wait_oldest:  # pragma: no cover - GPU only
                event, _ = self._copying.popleft()
            else:
                event = None
            while self._copying and self._copying[0][0].query():  # pragma: no cover - GPU only
                self._copying.popleft()
        if event is not None:  # pragma: no cover - GPU only
            event.synchronize()
        return True

    def _decode(self, tensors: dict[str, Any], slot: Any = None, copy: bool = False) -> dict[str, Any]:
        """Stored experts decoded on their device (into ``slot``'s views when given). With ``copy``, the
        other tensors (e.g. bf16 biases) are copied too: they are views of the host entry's pool slot,
        which goes back to the pool (and is overwritten) when the host tier drops that entry."""
        out = {}
        for n, t in tensors.items():
            if isinstance(t, StoredTensor):
                buf = slot.tensor(t.layout.stored_shape, t.dtype) if slot is not None else None
                out[n] = t.dequantize(out=buf)
            elif copy:
                out[n] = slot.tensor(t.shape, t.dtype).copy_(t) if slot is not None else t.clone()
            else:
                out[n] = t
        return out

    def _to_device(self, host: ExpertWeights, background: bool) -> ExpertWeights:
        if not self.on_cuda:
            if not self.decode_on_insert:
                return host
            slot = self.dev_pool.take() if self.dev_pool is not None else None
            tensors = self._decode(host.tensors, slot, copy=True)
            return ExpertWeights(tensors, sum(nbytes_of(t) for t in tensors.values()), tier=host.tier, slot=slot)
        stream = self._stream if background else torch.cuda.current_stream(self.device)  # pragma: no cover
        with torch.cuda.stream(stream):  # pragma: no cover - GPU only
            # the stored bytes cross PCIe; decoding (when the device keeps decoded experts) runs on the GPU
            tensors = {n: t.to(self.device, non_blocking=True) for n, t in host.tensors.items()}
            if self.decode_on_insert:
                tensors = self._decode(tensors)
            event = torch.cuda.Event()
            event.record(stream)
        if host.slot is not None:  # pragma: no cover - GPU only
            # Torch does not track views of our pool buffer: the host entry (and its slot) must outlive
            # the asynchronous copy even if the host cache drops it. Held here, released by _reap.
            self._reap()
            with self._lock:
                self._copying.append((event, host))
        nbytes = sum(nbytes_of(t) for t in tensors.values())  # pragma: no cover - GPU only
        return ExpertWeights(tensors, nbytes, ready=event, tier=host.tier)  # pragma: no cover

    def _take_host(self, key: Key) -> ExpertWeights | None:
        with self._lock:
            if self.exclusive:
                return self.host.pop(key)
            return self.host.get(key)

    def _insert_device(self, key: Key, dev: ExpertWeights, host: ExpertWeights, background: bool) -> bool:
        """Put ``dev`` in the device cache; demote what it evicts (CPU). False if it did not fit."""
        with self._lock:
            if background:
                # never evict what the current layer is about to use
                pins = [k for k in self._protected if k in self.dev]
                for k in pins:
                    self.dev.pin(k)
                try:
                    stored, evicted = self.dev.put(key, dev, dev.nbytes)
                finally:
                    for k in pins:
                        self.dev.unpin(k)
            else:
                stored, evicted = self.dev.put(key, dev, dev.nbytes)
            for k, v in evicted:
                if self.exclusive:
                    self.host.put(k, v, v.nbytes)
            if not stored and self.exclusive:
                self.host.put(key, host, host.nbytes)
            elif not self.exclusive and self.host.enabled and key not in self.host:
                self.host.put(key, host, host.nbytes)
            return stored

    def _load(self, key: Key, background: bool) -> tuple[ExpertWeights, str, int]:
        """Bring ``key`` into the device cache: ``(device entry, tier it came from, bytes moved)``."""
        host = self._take_host(key)
        tier = "host"
        if host is None:
            host = self._read(key)
            tier = host.tier
        dev = self._to_device(host, background)
        dev.tier = tier
        dev.moved = host.nbytes
        self._insert_device(key, dev, host, background)
        return dev, tier, host.nbytes

    def _background_load(self, key: Key) -> str:
        try:
            with self._lock:
                if key in self.dev:
                    return "device"
            return self._load(key, background=True)[1]
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def _submit(self, key: Key) -> None:
        """Queue a background read unless cached or queued (call with the lock held)."""
        if self._worker is None or key in self.dev or key in self._inflight:
            return
        self._inflight[key] = self._worker.submit(self._background_load, key)

    # -- the forward's side ------------------------------------------------------------------
    def begin_layer(self, layer: int, hidden: torch.Tensor, active: list[int] | None, counts: list[int] | None) -> None:
        """Before a layer's experts run: record routing, queue this layer's misses and prefetch the next layer."""
        if self.bypass_caches:
            return
        st = self.stats.layers[layer]
        self._active[layer] = {}
        with self._lock:
            self._protected = {(layer, e) for e in (active or [])}
            self._resident = {k for k in self._protected if k in self.dev}
            if active is None:
                self._resident = {k for k in self.dev.keys() if k[0] == layer}
            else:
                self._evaluate_prediction(layer, set(active))
                self._cancel_unneeded(layer, set(active))
                # early reads overlap the compute of the cached experts; no more than the cache can take
                # beside what this layer already holds, or they would only be dropped and read again
                misses = [e for e in active if (layer, e) not in self.dev]
                # Misses already in host RAM that the CPU may compute are left to _acquire's cost model:
                # an early copy to the device cache would always pre-empt that choice.
                rows = dict(zip(range(len(counts)), counts)) if counts is not None else {}
                misses = [e for e in misses if not self._cpu_candidate((layer, e), rows.get(e, 1))]
                for e in misses[: self._room(self.layers[layer], len(active) - len(misses))]:
                    self._submit((layer, e))
            if counts is not None:
                for e, c in enumerate(counts):
                    st.slots[e] += c
        if self._worker is not None and layer + 1 < len(self.layers):
            predicted = self.predict(layer + 1, hidden)
            with self._lock:
                self._predicted[layer + 1] = predicted
                for e in predicted:
                    if (layer + 1, e) not in self.dev and (layer + 1, e) not in self._inflight:
                        self.stats.prefetch_issued += 1
                        self._submit((layer + 1, e))

    def compute_order(self, layer: int, active: list[int]) -> list[int]:
        """Cached experts first: their compute overlaps the reads of the others (queued in index order)."""
        with self._lock:
            cached = {e for e in active if (layer, e) in self.dev}
        return [e for e in active if e in cached] + [e for e in active if e not in cached]

    def end_layer(self, layer: int) -> None:
        """After a layer's experts ran (module_list layers learn their routing only here)."""
        if self.bypass_caches:
            return
        used = self._active.pop(layer, {})
        spec = self.layers[layer]
        if spec.storage == "module_list":
            st = self.stats.layers[layer]
            with self._lock:
                for e, rows in used.items():
                    st.slots[e] += rows
                self._evaluate_prediction(layer, set(used))
        with self._lock:
            self._protected = set()

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

    @torch.no_grad()
    def predict(self, layer: int, hidden: torch.Tensor) -> set[int]:
        """Experts layer ``layer`` will likely use: its own router applied to the current hidden state.

        The router's ``forward`` is called directly (no hooks, so output recorders do not see it);
        routers returning ``(logits, weights, indices)`` give their exact top-k choice for this input.
        """
        spec = self.layers[layer]
        router = spec.router
        if router is None:
            return set()
        x = hidden.reshape(-1, hidden.shape[-1])
        w = getattr(router, "weight", None)
        if isinstance(w, torch.Tensor) and w.shape[-1] != x.shape[-1]:
            return set()
        if _takes_hidden_only(type(router)):
            out = type(router).forward(router, x)
        elif isinstance(w, torch.Tensor) and w.dim() == 2:
            out = torch.nn.functional.linear(x.to(w.dtype), w)  # routers needing more inputs (MiniMax-M2's bias)
        else:
            return set()
        if isinstance(out, tuple):
            idx = out[-1] if not out[-1].is_floating_point() else None
            logits = out[0]
        else:
            idx, logits = None, out
        if idx is None:
            idx = torch.topk(logits.float(), min(spec.top_k, logits.shape[-1]), dim=-1).indices
        # One host transfer; indexing a CUDA tensor per expert would sync once per expert (128 per layer:
        # most of a 106 ms decode step on an H100).
        counts = torch.bincount(idx.reshape(-1).clamp(0, spec.num_experts - 1), minlength=spec.num_experts).tolist()
        limit = self.cfg.max_prefetch_per_layer
        if limit is None:
            limit = self._prefetch_limit(spec)
        return set(most_used(counts, limit))

    def _room(self, spec: OffloadLayer, held: int) -> int:
        if self.dev.budget is None:
            return spec.num_experts
        return max(0, int(self.dev.budget // max(spec.expert_bytes, 1)) - held)

    def _prefetch_limit(self, spec: OffloadLayer) -> int:
        if self.dev.budget is None:
            return spec.num_experts
        per_expert = max(spec.expert_bytes, 1)
        # half the device cache for what the next layer may need, at least its top-k
        return max(spec.top_k, int(self.dev.budget // per_expert) // 2)

    def _acquire(self, key: Key, rows: int) -> tuple[ExpertWeights, str]:
        """The expert's weights and where to compute it ("device" or "cpu"). Pins it in its cache."""
        st = self.stats.layers[key[0]]
        with self._lock:
            entry = self.dev.get(key)
            if entry is not None:
                self.dev.pin(key)
                # loaded after the layer began (an early read of a miss): it counts in its source tier
                tier = "device" if key in self._resident else entry.tier
                st.hits[tier] += 1
                self.stats.bytes_read[self.phase][tier] += entry.nbytes if tier == "device" else entry.moved
                return entry, "device"
            fut = self._inflight.get(key)
            if fut is None and self._cpu_candidate(key, rows):
                # Decided and pinned under one lock: the worker cannot evict it in between.
                host = self.host.get(key)
                self.host.pin(key)
                st.hits["host"] += 1
                st.cpu_computed += 1
                self.stats.bytes_read[self.phase]["host"] += host.nbytes
                return host, "cpu"
        t0 = time.perf_counter()
        tier = None
        if fut is not None:
            tier = fut.result()  # re-raises a background read error
            with self._lock:
                entry = self.dev.get(key)
                if entry is not None:
                    self.dev.pin(key)
                    tier = entry.tier if tier == "device" else tier
        if entry is None:
            entry, tier, _ = self._load(key, background=False)
            with self._lock:
                if key in self.dev:
                    self.dev.pin(key)
        with self._lock:
            self.stats.stall_s += time.perf_counter() - t0
            st.hits[tier] += 1
            self.stats.bytes_read[self.phase][tier] += entry.moved if tier != "device" else entry.nbytes
        return entry, "device"

    def _cpu_candidate(self, key: Key, rows: int) -> bool:
        """The miss is in host RAM and should be computed there (caller holds the lock): on CUDA when
        the cost model says so, on a CPU-only run only on request ("always")."""
        allowed = self.cfg.cpu_compute != "never" if self.on_cuda else self.cfg.cpu_compute == "always"
        if not allowed or key not in self.host:
            return False
        return self._cpu_wins(key, rows, self.host.get(key, touch=False))

    def _cpu_wins(self, key: Key, rows: int, host: ExpertWeights) -> bool:
        if self.cfg.cpu_compute == "always":
            return True
        bw = self.cfg.bandwidths
        return bw is not None and prefer_cpu(rows, host.nbytes, self._flops[key[0]], bw)

    def _release(self, key: Key, site: str) -> None:
        with self._lock:
            (self.host if site == "cpu" else self.dev).unpin(key)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Compute expert ``expert`` of ``layer`` on rows ``x`` with weights from the tiers."""
        key = (layer, expert)
        spec = self.layers[layer]
        if self.bypass_caches:
            return compute_expert(spec, expert, x, {n: t.to(x.device) for n, t in self.source.read(layer, expert).items()})
        self._active.setdefault(layer, {})
        self._active[layer][expert] = self._active[layer].get(expert, 0) + x.shape[0]
        entry, site = self._acquire(key, x.shape[0])
        try:
            if entry.ready is not None:  # pragma: no cover - GPU only
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(entry.ready)
                # allocated on the side stream, used on this one: the allocator must not reuse them early
                for t in entry.tensors.values():
                    for part in tensors_of(t):
                        part.record_stream(stream)
            weights = {n: materialize(t) for n, t in entry.tensors.items()}
            if torch.is_grad_enabled() and x.requires_grad:
                # Autograd keeps these for backward, but the cache slot is recycled after _release:
                # own copies keep gradients w.r.t. the input exact (the experts themselves are frozen).
                weights = {n: t.clone() for n, t in weights.items()}
            if site == "cpu" and x.device.type != "cpu":  # pragma: no cover - GPU only
                return compute_expert(spec, expert, x.to("cpu"), weights).to(x.device)
            return compute_expert(spec, expert, x, weights)
        finally:
            self._release(key, site)

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


def most_used(counts: list[int], limit: int) -> list[int]:
    """Indices of the ``limit`` largest non-zero counts, largest first (ties: lower index first)."""
    order = sorted(range(len(counts)), key=lambda e: -counts[e])[:limit]
    return [e for e in order if counts[e] > 0]
