"""The offload engine: serves expert weights to the forward from device slots -> host cache -> source.

Per MoE layer a family's forward calls :meth:`OffloadEngine.dispatch` (through its runner) with the layer's
routing. It makes one host transfer (this layer's expert counts, with the next layer's predicted counts and
the routing check appended), does the layer's bookkeeping with a few tensor operations, computes every
expert already cached with one grouped GEMM over slot indices, and only then works through the misses one
by one (their reads were queued first, so they overlap that GEMM). Experts kept as a list of modules,
which their block calls one at a time, go through :meth:`run_expert` between :meth:`begin_layer` and
:meth:`end_layer`.

The pieces, one file each: the attach-time :mod:`.plan`; the tiers (:mod:`.device_tier` slots,
:mod:`.cache` host RAM, one :mod:`.policy`); :mod:`.reader` (source reads), :mod:`.loader` (moves between
tiers), :mod:`.prefetch` (predicted reads on background threads), :mod:`.leases` (what a computing caller
holds), and the device :mod:`.backends` (CPU, CUDA) chosen once here.

Tiers and their invariants:

- *device slots* (``expert_cache`` bytes): experts ready on ``device``, ``N = budget // bytes per expert``
  fixed slots per expert layout. Hard budget: the slots are all there is.
- *host cache* (``host_cache`` bytes, pinned on CUDA): experts in host RAM in their stored bytes,
  inclusive of the device slots. On a CPU-only run the device slots already are host RAM: when both tiers
  would hold the same bytes, the host budget simply adds slots (one RAM tier, nothing is ever copied from
  one RAM tier to another to compute it); the host tier exists there only to keep the compact stored copy
  of experts the slots hold decoded.
- *source*: the checkpoint's safetensors (or the model's own RAM for ``patch_model``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import torch

from ..dispatch.core import dispatch_combine
from ..errors import ExpertOutputError
from ..formats import materialize
from ..kernels.crossover import CROSSOVERS
from ..validation import check_routing, check_summary, routing_summary
from .backends import make_backend
from .cache import Key, TierCache
from .costmodel import Bandwidths, expert_flops_per_row, prefer_cpu
from .device_tier import SlotGroup, build_device_tier
from .layers import OffloadLayer
from .leases import HostLease, Lease, ReadLease, SlotLease
from .loader import TierLoader
from .options import OffloadOptions
from .plan import EnginePlan, encoded_nbytes
from .policy import POLICIES
from .prefetch import Prefetcher, expert_counts
from .reader import Reader, make_pool
from .slab import TensorSlab
from .slot_kernels import GroupKernel, SlotKernels
from .sources import ExpertSource
from .stats import LayerStats, OffloadStats


@dataclass(frozen=True)
class _OutputCheck:
    """A layer's output check in flight: whether it is finite (a device tensor), and what to name the expert with."""

    layer: int
    finite: torch.Tensor
    x: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    weight_inputs: bool


@dataclass
class _CpuJob:
    """Misses computed on a CPU thread while the device computes the layer's hits."""

    future: Future
    leases: dict[int, Lease]

    def finish(self) -> None:
        """Wait for the thread (it reads the pinned host entries), then release them."""
        try:
            self.future.result()
        except Exception:  # noqa: BLE001 - already raised to the forward by dispatch, or about to be
            pass
        for lease in self.leases.values():
            lease.release()


class OffloadEngine:
    def __init__(self, layers: list[OffloadLayer], source: ExpertSource, options: OffloadOptions, plan: EnginePlan):
        self.layers, self.source, self.options, self.plan = layers, source, options, plan
        self.device = plan.device
        self.lock = threading.RLock()
        self.backend = make_backend(self.device, self.lock)
        converts = plan.slot_dtype is not None and plan.slot_dtype != layers[0].dtype
        self.stats = OffloadStats(
            layers=[LayerStats(layer.num_experts) for layer in layers],
            device=self.device.type,
            expert_bytes=max(layer.expert_bytes for layer in layers),
            bandwidths=plan.bandwidths,
            stored_expert_bytes=max(source.nbytes(layer.index, 0) for layer in layers),
            device_format=plan.device_format if plan.stored else None,
            compute_dtype=str(plan.slot_dtype).removeprefix("torch.") if converts else None,
        )
        policy = POLICIES[options.policy]
        self.dev = build_device_tier(
            layers,
            {layer.index: self._entry_bytes(layer) for layer in layers},
            plan.device_budget,
            policy,
            options.hot_experts,
            plan.slot_dtype,
            plan.compute_ready,
            self.device,
        )
        self.host = TierCache(plan.host_budget, policy, options.hot_experts, name="host_cache")
        held = self.dev.budget if plan.merged else self.host.budget
        self.pool = make_pool(
            source,
            layers,
            held,
            plan.merged and plan.compute_ready,
            plan.cache_format,
            plan.io_threads,
            self.backend.pins_host,
        )
        self.reader = Reader(source, self.pool, self.stats, self.lock, plan.cache_format, self.backend)
        self.loader = TierLoader(self.dev, self.host, self.reader, source, self.backend, plan, self.lock)
        self.prefetcher = Prefetcher(
            layers,
            self.dev,
            self.stats,
            self.lock,
            self.loader.background_load,
            plan.io_threads,
            options.max_prefetch_per_layer,
        )
        self._pending: _OutputCheck | None = None  # the last layer's output, checked at the next transfer
        self._active: dict[int, dict[int, int]] = {}  # expert lists: rows per expert of the running layer
        self._flops = {layer.index: expert_flops_per_row(layer.shapes) for layer in layers}
        self._banks: dict[tuple[int, int, int], object] = {}
        # the CPU kernels over the slots (CPU-only runs)
        self.kernels = SlotKernels(layers, self.device, source, encoded=plan.cache_format is not None)
        self._cpu_bw: dict[int, Bandwidths] = {}  # per layer: the CPU rate of its host-tier experts
        #: misses the CPU computes from host RAM run on a CPU thread while the device computes the hits (GPU runs)
        self.overlap_cpu = self.backend.asynchronous
        self._cpu_pool: ThreadPoolExecutor | None = None
        self.phase = "prefill"
        self.closed = False
        self.bypass_caches = False  # full-precision reads straight from the source (quantization error)
        self._homes: dict[int, tuple[int, torch.Tensor]] = {}  # layer -> (its table's version, _home_map)
        self._missed: dict[int, bool] = {}  # layer -> whether its last call had an expert not in a slot

    # -- what the plan decided, as the statistics and tests read it -------------------------------------
    @property
    def stored(self) -> bool:
        return self.plan.stored

    @property
    def merged(self) -> bool:
        return self.plan.merged

    def _entry_bytes(self, layer: OffloadLayer) -> int:
        """Bytes of one device-tier entry of ``layer``."""
        if self.plan.compute_ready:
            return TensorSlab.nbytes_per_slot(layer.shapes, self.plan.slot_dtype or layer.dtype)
        if self.plan.cache_format is not None:
            return encoded_nbytes(layer, self.plan.cache_format)
        return self.source.nbytes(layer.index, 0)

    # -- the forward's side: a whole layer -------------------------------------------------------
    def dispatch(
        self,
        layer: int,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        weight_inputs: bool = False,
        checked_by: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The routed experts of ``layer`` on ``x [T, H]``: every cached expert in one grouped GEMM over
        slot indices, then the misses. One host transfer per layer, which also carries the routing check
        of ``checked_by`` (the experts module: bad routing raises :class:`RoutingError` naming it)."""
        spec = self.layers[layer]
        E = spec.num_experts
        grad = torch.is_grad_enabled() and x.requires_grad
        # the short path is the CPU kernels' (slots on the CPU): nothing of it runs, or syncs, on a GPU
        short = not (grad or self.bypass_caches) and self.kernels.enabled
        gk = self.kernels.get(spec, self.dev.group_of[layer]) if short else None
        home = self._home_map(layer) if gk is not None else None
        if home is not None and not self._predicts(layer + 1):
            index = home[top_k_index.clamp(0, E)]
            if bool((index >= 0).all()):  # every routed expert is in its slot already
                routing = (x, top_k_index, top_k_weights)
                return self._dispatch_home(spec, gk, home, index, *routing, checked_by, weight_inputs)
        summary = routing_summary(checked_by, top_k_index, top_k_weights) if checked_by is not None else None
        if self.bypass_caches:
            return dispatch_combine(
                x,
                top_k_index,
                top_k_weights,
                E,
                lambda e, rows: spec.compute_expert(
                    e, rows, {n: t.to(rows.device) for n, t in self.source.read(layer, e).items()}
                ),
                weight_inputs=weight_inputs,
            )
        counts = expert_counts(top_k_index, E).to(torch.float64)
        prefetching = self._predicts(layer + 1) and not self._resident(layer + 1)
        predicted = self.prefetcher.predict_counts(layer + 1, x) if prefetching else None
        pending, self._pending = self._pending, None  # the previous layer's output check rides along
        parts = [counts] + ([predicted.to(torch.float64)] if predicted is not None else [])
        parts += [pending.finite.reshape(1).to(torch.float64)] if pending is not None else []
        parts += [summary] if summary is not None else []
        host = torch.cat(parts).cpu()  # the layer's one host transfer
        n_pred = predicted.numel() if predicted is not None else 0
        checks = host[E + n_pred :].tolist() if pending is not None or summary is not None else []  # one read
        if pending is not None and not checks[0]:
            self._name_nonfinite(pending)
        if summary is not None:
            check_summary(checked_by, checks[-3:], E)
        counts_h = host[:E].to(torch.int64)
        active = counts_h.nonzero().flatten()
        group = self.dev.group_of[layer]
        table = group.table
        st = self.stats.layers[layer]
        with self.lock:
            slots = table.lookup(layer, active)
            hit = slots >= 0
            hit_experts, hit_slots = active[hit], slots[hit]
            table.touch(layer, hit_experts, hit_slots)
            table.pin(hit_slots)
            # the one conversion to Python of this layer's bookkeeping (CPU tensors: no device sync)
            routed, cached, rows, slot_of = torch.stack([active, hit.to(torch.int64), counts_h[active], slots]).tolist()
            misses = [e for e, c in zip(routed, cached) if not c]
            self._missed[layer] = bool(misses)
            held = [s for s, c in zip(slot_of, cached) if c]
            span = (min(held), max(held) + 1) if held else (0, 0)
            self.loader.protected = {(layer, e) for e in routed}
            self.loader.arrived = {}
            st.add_slots(counts_h)
            n_hits = len(routed) - len(misses)
            st.hits["device"] += n_hits
            self.stats.bytes_read[self.phase]["device"] += n_hits * table.slot_bytes
            actual = set(routed)
            self.prefetcher.evaluate(layer, actual)
            self.prefetcher.cancel_unneeded(layer, actual)
            # early reads of the misses overlap the grouped GEMM of the hits; misses the CPU may compute
            # from host RAM are left to acquire's cost model (an early copy would pre-empt it)
            rows_of = dict(zip(routed, rows))
            early = [e for e in misses if not self._cpu_candidate((layer, e), rows_of[e])]
            for e in early[: max(0, table.capacity - n_hits)]:
                self.prefetcher.submit((layer, e), cached=False)
            if predicted is not None:
                self.prefetcher.prefetch(layer + 1, host[E : E + n_pred].to(torch.int64))
        job = None
        if self.overlap_cpu and not grad and len(early) < len(misses):
            # misses the CPU computes from host RAM start on a CPU thread now, while the device computes the hits
            job = self._launch_cpu(
                spec, [e for e in misses if e not in set(early)], rows_of, x, top_k_index, top_k_weights, weight_inputs
            )
            if job is not None:
                misses = [e for e in misses if e not in job.leases]
        try:
            try:
                out = self._compute_slots(
                    spec, group, x, top_k_index, top_k_weights, hit_experts, hit_slots, span, weight_inputs
                )
            finally:
                self.loader.unpin(table, hit_slots)
            gk = self.kernels.get(spec, group) if misses and not grad else None
            if gk is not None:
                out = self._kernel_misses(gk, layer, misses, rows_of, x, top_k_index, top_k_weights, out, weight_inputs)
            elif misses:
                keep = torch.zeros(E + 1, dtype=torch.bool)
                keep[misses] = True
                miss_index = torch.where(
                    self.backend.routing_table(keep, top_k_index)[top_k_index.clamp(0, E)],
                    top_k_index,
                    torch.full_like(top_k_index, E),
                )
                out = out + dispatch_combine(
                    x,
                    miss_index,
                    top_k_weights,
                    E,
                    lambda e, rows: self._run(layer, e, rows),
                    weight_inputs=weight_inputs,
                )
            if job is not None:
                out = out + job.future.result().to(device=out.device, dtype=out.dtype)
        finally:
            if job is not None:
                job.finish()
        with self.lock:
            self.loader.protected = set()
        # checked at the next layer's host transfer (or when the forward ends): no sync of its own
        self._pending = _OutputCheck(layer, torch.isfinite(out).all(), x, top_k_index, top_k_weights, weight_inputs)
        return out

    def _predicts(self, layer: int) -> bool:
        """Whether the layer before ``layer`` should run ``layer``'s router to read its experts ahead: always for a
        table that evicts, and for one where every expert has a slot of its own (nothing is evicted) only while
        ``layer`` still misses (its last call loaded an expert)."""
        if not self.prefetcher.enabled_for(layer):
            return False
        return self._home_map(layer) is None or self._missed.get(layer, True)

    def _home_map(self, layer: int) -> torch.Tensor | None:
        """``[E + 1]`` expert -> slot (-1: not loaded yet) of a layer whose every expert has a slot of its own
        (:attr:`SlotTable.homes`: nothing is ever evicted), the last entry, for ids outside ``[0, E)``, past every
        slot (skipped); kept while no slot of its table changes hands. None for a table that evicts."""
        table = self.dev.group_of[layer].table
        if not table.homes:
            return None
        cached = self._homes.get(layer)
        if cached is not None and cached[0] == table.version:
            return cached[1]
        with self.lock:  # loads assign slots under the lock: the map and its version agree
            version = table.version
            home = torch.cat([table.slot_of[layer], torch.tensor([table.capacity])])
        self._homes[layer] = (version, home)
        return home

    def _dispatch_home(
        self,
        spec: OffloadLayer,
        gk: GroupKernel,
        home: torch.Tensor,
        index: torch.Tensor,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        checked_by: torch.nn.Module | None,
        weight_inputs: bool,
    ) -> torch.Tensor:
        """A call whose routed experts all sit in slots of their own, on the CPU kernels (``index``: the routing
        mapped to slots): nothing to look up, pin, read, predict or evict, so only the checks, the statistics and one
        kernel call over the slots (a model that fits its budget decodes at ``patch_model``'s speed, not at the
        bookkeeping's). CPU tensors: the checks read values directly, as ``patch_model``'s do."""
        E, table = spec.num_experts, self.dev.group_of[spec.index].table
        pending, self._pending = self._pending, None
        if pending is not None and not bool(pending.finite):
            self._name_nonfinite(pending)
        if checked_by is not None:
            check_routing(checked_by, top_k_index, top_k_weights, E)
        # ids outside [0, E) (dropped slots; any id with the routing check off) are not counted, as histc does
        counts = torch.bincount(top_k_index.reshape(-1).clamp(-1, E) + 1, minlength=E + 2)[1 : E + 1]
        active = counts.nonzero().flatten()
        self._missed[spec.index] = False
        with self.lock:
            self.stats.layers[spec.index].add_slots(counts)
            self.stats.layers[spec.index].hits["device"] += active.numel()
            self.stats.bytes_read[self.phase]["device"] += active.numel() * table.slot_bytes
            self.prefetcher.evaluate(spec.index, set(active.tolist()))
        gk.sync(home[active].tolist())
        out = gk.kernel.forward(x.contiguous(), index, top_k_weights.contiguous(), weight_inputs=weight_inputs)
        finite = torch.isfinite(out).all()
        self._pending = _OutputCheck(spec.index, finite, x, top_k_index, top_k_weights, weight_inputs)
        return out

    def _launch_cpu(
        self,
        spec: OffloadLayer,
        experts: list[int],
        rows_of: dict[int, int],
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        weight_inputs: bool,
    ) -> _CpuJob | None:
        """Start the host-resident misses ``experts`` on a CPU thread through the CPU kernel (their host entries
        pinned here, released when the job is finished); None when no kernel computes this layer's entries."""
        kernel = self.kernels.host(spec)
        if kernel is None:
            return None
        leases: dict[int, Lease] = {}
        for e in experts:
            lease = self.acquire((spec.index, e), rows_of[e], host_raw=True)
            if lease.on_cpu and lease.stored is not None:
                leases[e] = lease
            else:  # it found a slot meanwhile (a read that arrived): the device computes it with the misses
                lease.release()
        if not leases:
            return None
        E = spec.num_experts
        idx = top_k_index.to("cpu")
        keep = torch.zeros(E + 1, dtype=torch.bool)
        keep[list(leases)] = True
        index = torch.where(keep[idx.clamp(0, E)], idx, torch.full_like(idx, E))
        xc, wc = x.to("cpu"), top_k_weights.to("cpu")
        if self._cpu_pool is None:
            self._cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="moe-patch-cpu-experts")
        future = self._cpu_pool.submit(
            dispatch_combine,
            xc,
            index,
            wc,
            E,
            lambda e, rows: self.kernels.run_host(kernel, leases[e].stored, rows),
            weight_inputs=weight_inputs,
        )
        return _CpuJob(future, leases)

    def _resident(self, layer: int) -> bool:
        """Every expert of ``layer`` sits in a slot of its own (nothing to predict or read ahead): one small
        tensor check instead of running the next router."""
        table = self.dev.group_of[layer].table
        return table.homes and bool((table.slot_of[layer] >= 0).all())

    def forget_checks(self) -> None:
        """A new forward begins: an output check left by one that raised belongs to it, not to this one."""
        self._pending = None

    def check_outputs(self) -> None:
        """The last layer's output check (the forward has ended and been synchronised)."""
        pending, self._pending = self._pending, None
        if pending is not None and not bool(pending.finite):
            self._name_nonfinite(pending)

    def _name_nonfinite(self, check: _OutputCheck) -> None:
        """Raise :class:`ExpertOutputError` naming the layer and the first expert whose output is non-finite
        (each active expert recomputed on its rows: only after a failure)."""
        spec, E = self.layers[check.layer], self.layers[check.layer].num_experts
        where = spec.experts_path
        if not bool(torch.isfinite(check.x).all()):
            raise ExpertOutputError(
                f"{where}: its input holds NaN or inf (from the layers before it: attention or "
                f"an earlier MoE layer overflowed {check.x.dtype}); no expert is at fault here."
            )
        for e in sorted(set(check.top_k_index.reshape(-1).tolist()) & set(range(E))):
            rows = (check.top_k_index == e).any(-1).nonzero().flatten()
            lease = self.acquire((check.layer, e), len(rows))
            try:
                y = spec.compute_expert(e, check.x[rows].to(lease.weights[spec.param_names[0]].device), lease.weights)
            finally:
                lease.release()
            if not bool(torch.isfinite(y).all()):
                raise ExpertOutputError(
                    f"{where}: expert {e} turns finite inputs into NaN or inf: its weights in the checkpoint hold "
                    f"non-finite values, or overflow {y.dtype} (load in bfloat16 or float32)."
                )
        raise ExpertOutputError(
            f"{where}: the weighted sum of its experts' outputs overflows {check.x.dtype} "
            "(every expert's own output is finite); load in bfloat16 or float32."
        )

    def _compute_slots(
        self,
        spec: OffloadLayer,
        group: SlotGroup,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        experts: torch.Tensor,
        slots: torch.Tensor,
        span: tuple[int, int],
        weight_inputs: bool,
    ) -> torch.Tensor:
        """The cached experts of a layer: one grouped GEMM over slot indices (compute-ready slabs), or each
        entry decoded and computed (stored / cache-encoded object slots)."""
        E = spec.num_experts
        if experts.numel() == 0:
            return torch.zeros(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
        if self.backend.asynchronous or group.slab is None:  # pending copies, or object entries, to wait for
            for s in slots.tolist():
                self.loader.wait(group, s)
        grad = torch.is_grad_enabled() and x.requires_grad
        gk = None if grad else self.kernels.get(spec, group)
        if gk is not None:  # the CPU kernels, straight from the slots (stored bytes or slab views)
            gk.sync(slots.tolist())
            return gk.run(x, (experts, slots), E, top_k_index, top_k_weights, weight_inputs=weight_inputs)
        if group.slab is None or grad:
            # one expert at a time; under autograd on owned copies (slots are recycled after this layer)
            by_expert = dict(zip(experts.tolist(), slots.tolist()))
            keep = torch.full((E + 1,), E, dtype=torch.int64)
            keep[experts] = experts
            index = self.backend.routing_table(keep, top_k_index)[top_k_index.clamp(0, E)]

            def one(e: int, rows: torch.Tensor) -> torch.Tensor:
                weights = {n: materialize(t) for n, t in group.entry(by_expert[e]).items()}
                if grad:
                    weights = {n: t.clone() for n, t in weights.items()}
                return spec.compute_expert(e, rows, weights)

            return dispatch_combine(x, index, top_k_weights, E, one, weight_inputs=weight_inputs)
        # the grouped GEMM runs over the slot range holding this layer's cached experts only (with every
        # expert at home, exactly the layer's own experts): slots outside it are neither read nor looped over
        lo, hi = span
        remap = torch.full((E + 1,), hi - lo, dtype=torch.int64)  # not cached (or dropped): past the range
        remap[experts] = slots - lo
        slot_index = self.backend.routing_table(remap, top_k_index)[top_k_index.clamp(0, E)]
        return self.backend.compute(self._bank(spec, group, lo, hi), x, slot_index, top_k_weights, weight_inputs)

    def _bank(self, spec: OffloadLayer, group: SlotGroup, lo: int, hi: int):
        key = (spec.index, lo, hi)
        bank = self._banks.get(key)
        if bank is None:
            if len(self._banks) > 4 * len(self.layers):  # ranges move with evictions: keep the recent ones
                self._banks.clear()
            bank = self._banks[key] = spec.slot_bank({n: t[lo:hi] for n, t in group.slab.tensors.items()})
        return bank

    def _kernel_misses(
        self,
        gk,
        layer: int,
        misses: list[int],
        rows_of: dict[int, int],
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        out: torch.Tensor,
        weight_inputs: bool,
    ) -> torch.Tensor:
        """The misses through the CPU kernel: each brought into a slot (pinned), then one call that adds the
        slotted ones into ``out``; an expert that got no slot (every slot pinned by this layer) in torch."""
        spec = self.layers[layer]
        E = spec.num_experts
        host_kernel = self.kernels.host(spec) if self.plan.computes_on_cpu() else None
        slotted: dict[int, int] = {}
        leases: dict[int, Lease] = {}

        def one(e: int, rows: torch.Tensor) -> torch.Tensor:  # a miss without a slot: from the host tier or a read
            lease = leases[e]
            if lease.on_cpu and lease.stored is not None and host_kernel is not None:
                return self.kernels.run_host(host_kernel, lease.stored, rows)
            return spec.compute_expert(e, rows, lease.weights)

        try:
            for e in misses:
                lease = leases[e] = self.acquire(
                    (layer, e), rows_of[e], decoded=False, host_raw=host_kernel is not None
                )
                if isinstance(lease, SlotLease) and lease.slot is not None:
                    slotted[e] = lease.slot
            if slotted:
                gk.sync(list(slotted.values()))
                out = gk.run(x, slotted, E, top_k_index, top_k_weights, out.contiguous(), weight_inputs=weight_inputs)
            rest = [e for e in misses if e not in slotted]
            if rest:
                keep = torch.zeros(E + 1, dtype=torch.bool)
                keep[rest] = True
                index = torch.where(keep[top_k_index.clamp(0, E)], top_k_index, torch.full_like(top_k_index, E))
                out = out + dispatch_combine(x, index, top_k_weights, E, one, weight_inputs=weight_inputs)
        finally:
            for lease in leases.values():
                lease.release()
        return out

    # -- per expert: misses, and experts kept as a list of modules -----------------------------------
    def _run(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert that was not cached when its layer began (or an expert of a list)."""
        spec = self.layers[layer]
        host_kernel = self.kernels.host(spec) if self.plan.computes_on_cpu() else None
        lease = self.acquire((layer, expert), x.shape[0], host_raw=host_kernel is not None)
        try:
            if lease.on_cpu and lease.stored is not None and host_kernel is not None:
                # the CPU kernel reads the host entry's stored bytes (no decoded copy)
                y = self.kernels.run_host(host_kernel, lease.stored, x.to("cpu"))
                return y.to(x.device)
            weights = lease.weights
            if torch.is_grad_enabled() and x.requires_grad:
                # Autograd keeps these for backward, but the slot is recycled after release: own copies keep
                # gradients w.r.t. the input exact (the experts themselves are frozen).
                weights = {n: t.clone() for n, t in weights.items()}
            if lease.on_cpu and x.device.type != "cpu":  # pragma: no cover - GPU only
                return spec.compute_expert(expert, x.to("cpu"), weights).to(x.device)
            return spec.compute_expert(expert, x, weights)
        finally:
            lease.release()

    def acquire(self, key: Key, rows: int, decoded: bool = True, host_raw: bool = False) -> Lease:
        """The decoded weights of ``key``: from its device slot (loaded now if needed), or computed on the
        CPU from host RAM when the cost model says so. ``decoded=False``: a slot lease carries the slot only
        (the CPU kernels read the entry as the slot holds it; nothing is decoded); ``host_raw``: a host lease
        carries the host entry's tensors as stored, not decoded (the CPU kernels read them)."""
        st = self.stats.layers[key[0]]
        group = self.dev.group_of[key[0]]
        with self.lock:
            slot = group.table.slot(key)
            if slot >= 0:  # cached after the layer began: an early read that arrived, or a list's hit
                group.table.pin(torch.tensor([slot]))
                tier = self.loader.arrived.pop(key, "device")
                st.hits[tier] += 1
                self.stats.bytes_read[self.phase][tier] += (
                    group.table.slot_bytes if tier == "device" else self.source.nbytes(*key)
                )
                return self._slot_lease(group, slot, decoded)
            fut = self.prefetcher.inflight.get(key)
            if fut is None and self._cpu_candidate(key, rows):
                # Decided and pinned under one lock: the worker cannot evict it in between.
                host = self.host.get(key)
                self.host.pin(key)
                st.hits["host"] += 1
                st.cpu_computed += 1
                self.stats.bytes_read[self.phase]["host"] += host.nbytes
                self.stats.cpu_bytes[self.phase] += host.nbytes
                weights = {} if host_raw else {n: materialize(t) for n, t in host.tensors.items()}
                return HostLease(weights, partial(self._unpin_host, key), stored=host.tensors)
        t0 = time.perf_counter()
        if fut is not None:
            tier = fut.result()  # re-raises a background read error
            with self.lock:
                slot = group.table.slot(key)
                if slot >= 0:
                    group.table.pin(torch.tensor([slot]))
                    tier = self.loader.arrived.pop(key, tier if tier != "device" else "device")
                    self._account(st, key, tier, t0, group)
                    return self._slot_lease(group, slot, decoded)
        slot, host, tier, moved = self.loader.load(key, background=False)
        with self.lock:
            self._account(st, key, tier, t0, group, moved)
        if slot is not None:
            return self._slot_lease(group, slot, decoded)
        # every slot is pinned by this layer (a budget below its active experts): compute from the read
        return ReadLease(self.loader.from_read(host))

    def _slot_lease(self, group: SlotGroup, slot: int, decoded: bool = True) -> SlotLease:
        return SlotLease(
            self.loader.weights(group, slot) if decoded else {},
            partial(self.loader.unpin, group.table, torch.tensor([slot])),
            slot=slot,
        )

    def _unpin_host(self, key: Key) -> None:
        with self.lock:
            self.host.unpin(key)

    def _account(
        self, st: LayerStats, key: Key, tier: str, t0: float, group: SlotGroup, moved: int | None = None
    ) -> None:
        self.stats.stall_s += time.perf_counter() - t0
        st.hits[tier] += 1
        nbytes = (
            group.table.slot_bytes if tier == "device" else (moved if moved is not None else self.source.nbytes(*key))
        )
        self.stats.bytes_read[self.phase][tier] += nbytes

    def _cpu_candidate(self, key: Key, rows: int) -> bool:
        """The miss is in host RAM and should be computed there (caller holds the lock): on CUDA when
        the cost model says so, on a CPU-only run only on request ("always")."""
        if not self.plan.computes_on_cpu() or key not in self.host:
            return False
        if self.plan.cpu_compute == "always":
            return True
        bw = self._cpu_bandwidths(key[0])
        host = self.host.get(key, touch=False)
        return bw is not None and prefer_cpu(rows, host.nbytes, self._flops[key[0]], bw)

    def _cpu_bandwidths(self, layer: int) -> Bandwidths | None:
        """The plan's bandwidths, with the CPU's streaming rate the kernel's measured one for this layer's stored
        format where the CPU kernel computes its host-tier experts (torch's GEMV rate otherwise)."""
        bw = self.plan.bandwidths
        if bw is None:
            return None
        if layer not in self._cpu_bw:
            kernel = self.kernels.host(self.layers[layer])
            if kernel is None:
                self._cpu_bw[layer] = bw
            else:
                compute = torch.bfloat16 if self.layers[layer].dtype == torch.bfloat16 else torch.float32
                rate = CROSSOVERS.stream_rate(kernel.spec.gate_up.kind, compute)
                self._cpu_bw[layer] = replace(bw, cpu_gemv=rate)
        return self._cpu_bw[layer]

    # -- blocks that call their expert modules one by one ---------------------------------------------
    def begin_layer(self, layer: int, hidden: torch.Tensor) -> None:
        """Before such a block runs its experts: prefetch the next layer (routing is learnt per call)."""
        if self.bypass_caches:
            return
        self._active[layer] = {}
        with self.lock:
            self.loader.protected = {k for k in self.dev.keys() if k[0] == layer}
            self.loader.arrived = {}
        if self.prefetcher.enabled_for(layer + 1):
            predicted = self.prefetcher.predict_counts(layer + 1, hidden)
            if predicted is not None:
                host = predicted.cpu().to(torch.int64)
                with self.lock:
                    self.prefetcher.prefetch(layer + 1, host)

    def run_expert(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` of ``layer`` on rows ``x`` (its block calls each expert module)."""
        spec = self.layers[layer]
        if self.bypass_caches:
            return spec.compute_expert(
                expert, x, {n: t.to(x.device) for n, t in self.source.read(layer, expert).items()}
            )
        used = self._active.setdefault(layer, {})
        used[expert] = used.get(expert, 0) + x.shape[0]
        key = (layer, expert)
        group = self.dev.group_of[layer]
        with self.lock:
            if key in group.table:
                slot = group.table.slot(key)
                group.table.touch(layer, torch.tensor([expert]), torch.tensor([slot]))
        return self._run(layer, expert, x)

    def end_layer(self, layer: int) -> None:
        """After such a block ran: its routing is known now."""
        if self.bypass_caches:
            return
        used = self._active.pop(layer, {})
        st = self.stats.layers[layer]
        with self.lock:
            counts = torch.zeros(st.num_experts, dtype=torch.int64)
            for e, rows in used.items():
                counts[e] = rows
            st.add_slots(counts)
            self.prefetcher.evaluate(layer, set(used))
            self.loader.protected = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    def drain(self) -> None:
        """Wait for queued background reads (errors are left for the forward that needs them)."""
        self.prefetcher.drain()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._cpu_pool is not None:
            self._cpu_pool.shutdown(wait=True)
        self.prefetcher.close()
        self.source.close()
