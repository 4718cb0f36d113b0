"""Prediction and prefetch: while one layer computes, reader threads fetch the experts the next layer's router
is likely to pick (its own router on the current hidden state), and drop queued reads the real routing
made useless. A read error in the background is kept in its future and re-raised by the forward that needs
the expert (never zeros)."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..threads import serial_worker
from .cache import Key
from .device_tier import DeviceTier
from .layers import OffloadLayer
from .stats import OffloadStats


class Prefetcher:
    """The background reads of an engine (``load``: brings one key into the device tier in the background,
    returning the tier it came from). Methods marked so are called with the engine's ``lock`` held."""

    def __init__(
        self,
        layers: list[OffloadLayer],
        dev: DeviceTier,
        stats: OffloadStats,
        lock: threading.RLock,
        load: Callable[[Key], str],
        io_threads: int,
        max_per_layer: int | None,
    ):
        self.layers, self.dev, self.stats, self.lock, self.load = layers, dev, stats, lock, load
        self.max_per_layer = max_per_layer
        self.inflight: dict[Key, Future] = {}
        self._predicted: dict[int, set[int]] = {}
        self._worker = (
            ThreadPoolExecutor(io_threads, thread_name_prefix="moe-patch-prefetch", initializer=serial_worker)
            if io_threads
            else None
        )

    def enabled_for(self, layer: int) -> bool:
        """Whether ``layer``'s experts can be predicted and read ahead."""
        return self._worker is not None and layer < len(self.layers) and self.layers[layer].router is not None

    def submit(self, key: Key, cached: bool | None = None) -> None:
        """Queue a background read unless cached or queued (lock held)."""
        if self._worker is None or key in self.inflight or (key in self.dev if cached is None else cached):
            return
        self.inflight[key] = self._worker.submit(self._run, key)

    def _run(self, key: Key) -> str:
        try:
            return self.load(key)
        finally:
            with self.lock:
                self.inflight.pop(key, None)

    @torch.no_grad()
    def predict_counts(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
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
        counts = self.predict_counts(layer, hidden)
        if counts is None:
            return set()
        return set(most_used(counts.cpu(), self.limit(self.layers[layer])))

    def prefetch(self, layer: int, counts: torch.Tensor) -> None:
        """Queue background loads of ``layer``'s most likely experts (lock held)."""
        limit = self.limit(self.layers[layer]) if self.max_per_layer is None else self.max_per_layer
        predicted = most_used(counts, limit)
        self._predicted[layer] = set(predicted)
        if not predicted:
            return
        # the cached ones in one lookup (no Python per expert beyond the list itself)
        cached = self.dev.group_of[layer].table.lookup(layer, torch.tensor(predicted)) >= 0
        for e, c in zip(predicted, cached.tolist()):
            if not c and (layer, e) not in self.inflight:
                self.stats.prefetch_issued += 1
                self.submit((layer, e), cached=False)

    def limit(self, spec: OffloadLayer) -> int:
        capacity = self.dev.group_of[spec.index].table.capacity
        # half the device slots for what the next layer may need, at least its top-k
        return max(spec.top_k, capacity // 2) if capacity < spec.num_experts * len(self.layers) else spec.num_experts

    def cancel_unneeded(self, layer: int, actual: set[int]) -> None:
        """Drop queued (not started) prefetches of this layer's experts that its router did not pick: they
        would only delay the reads of its real misses (lock held)."""
        for key in [k for k in self.inflight if k[0] == layer and k[1] not in actual]:
            if self.inflight[key].cancel():
                del self.inflight[key]
                self.stats.prefetch_dropped += 1

    def evaluate(self, layer: int, actual: set[int]) -> None:
        """Count how well the prediction for ``layer`` matched its real routing (lock held)."""
        predicted = self._predicted.pop(layer, None)
        if predicted is None:
            return
        st = self.stats.layers[layer]
        st.predicted += len(predicted)
        st.predicted_used += len(predicted & actual)
        st.used_when_predicted += len(actual)

    def drain(self) -> None:
        """Wait for queued background reads (errors are left for the forward that needs them)."""
        with self.lock:
            futures = list(self.inflight.values())
        for f in futures:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - reported where the expert is used
                pass

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)


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
