"""Device-side accumulators of one MoE layer: every observation is a few reductions added in place.

Nothing here reads a value back to the host: counts grow with ``scatter_add_`` / ``index_add_`` on the
device the routing lives on (``torch.bincount`` is avoided because on CUDA it reads the input's maximum
back to size its output, a host sync per call). :func:`read_counts` moves every layer's accumulators to
the host in one transfer per device and dtype.

Op count matters more than FLOPs here (tensors are ``[tokens, experts]``): about 45 small kernels per
layer and call, so the scalars of one call are stacked and added in one go.
"""

from __future__ import annotations

import torch

from .readers import SIGMOID_KINDS, Routing
from .stats import LayerCounts

# Slots of the scalar sums vector: one contiguous slice per kind of observation, so each call adds its
# scalars with one stack + add_ (no index tensor to build: that would be a host-to-device copy).
ENTROPY, Z, LOGIT_TOKENS, NONFINITE_LOGITS = range(4)  # from the logits
DROPPED, WEIGHT, NONFINITE_WEIGHTS, TOPK_PROB, PROB_TOKENS = range(4, 9)  # from the routing
_LOGITS, _ROUTING, _SUMS = slice(0, 4), slice(4, 9), 9


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class LayerCounter:
    """Accumulators for one layer, allocated on the device of the first observation.

    ``assigned`` / ``requested`` hold ``width + 2`` bins: bin 0 counts negative expert ids, bin
    ``width + 1`` ids past the last expert, so an invalid id is counted rather than indexing out of bounds.
    """

    def __init__(self, path: str, num_experts: int, top_k: int, zero_experts: int = 0, routing_kind: str = "other"):
        self.path, self.num_experts, self.top_k, self.zero_experts = path, num_experts, top_k, zero_experts
        self.width = num_experts + zero_experts
        self.sigmoid = routing_kind in SIGMOID_KINDS
        self.tokens = 0  # host-known: shapes only
        self.host_assigned = [0] * self.width  # slots a router already counted on the host (JetMoE)
        self.capacity = False
        self._device: torch.device | None = None
        self._ones = torch.ones(0, dtype=torch.long)
        # This call's router distribution and its finite rows, kept until the routing arrives.
        self._probs: torch.Tensor | None = None
        self._probs_ok: torch.Tensor | None = None
        self.top1: torch.Tensor | None = None  # the stability check's capture
        self.changed: torch.Tensor | None = None  # share of tokens whose top-1 moved, last two checks

    # -- storage -----------------------------------------------------------------------------
    def _on(self, device: torch.device) -> None:
        if self._device == device:
            return
        if self._device is None:
            self.assigned = torch.zeros(self.width + 2, dtype=torch.long, device=device)
            self.requested = torch.zeros(self.width + 2, dtype=torch.long, device=device)
            self.sums = torch.zeros(_SUMS, dtype=_float_dtype(device), device=device)
        else:  # the model moved (model.to(...)): carry the counts along
            self.assigned, self.requested = self.assigned.to(device), self.requested.to(device)
            self.sums = self.sums.to(device, _float_dtype(device))
        self._ones = self._ones.to(device)
        self._zero = torch.zeros((), dtype=torch.float32, device=device)
        self._device = device

    def _ones_like(self, n: int) -> torch.Tensor:
        if self._ones.numel() < n:
            self._ones = torch.ones(max(n, 2 * self._ones.numel()), dtype=torch.long, device=self._device)
        return self._ones[:n]

    def zero_(self) -> None:
        self.tokens = 0
        self.host_assigned = [0] * self.width
        if self._device is not None:
            for t in (self.assigned, self.requested, self.sums):
                t.zero_()

    # -- observations ------------------------------------------------------------------------
    def add_logits(self, logits: torch.Tensor) -> None:
        """Router entropy, z-loss and non-finite rows from one call's logits ``[..., E]``."""
        self._on(logits.device)
        flat = logits.detach().reshape(-1, logits.shape[-1]).float()
        # The router's distribution: softmax of the logits, or for sigmoid routers their scores normalised.
        scores = torch.nn.functional.logsigmoid(flat) if self.sigmoid else flat
        top = scores.amax(dim=-1, keepdim=True)
        e = (scores - top).exp_()
        total = e.sum(dim=-1, keepdim=True)
        p = e.div_(total)
        # H = -sum p log p = logsumexp(scores) - sum p * scores: one exp pass, no log over every expert.
        lse_scores = (top + total.log()).squeeze(-1)
        entropy = lse_scores - (p * scores).sum(dim=-1)
        lse = torch.logsumexp(flat, dim=-1) if self.sigmoid else lse_scores  # z-loss: of the raw logits
        ok = torch.isfinite(entropy)  # a NaN or infinite logit anywhere in the row
        finite = ok.sum(dtype=torch.float32)
        values = [
            torch.where(ok, entropy, 0.0).sum(),
            torch.where(ok, lse, 0.0).square().sum(),
            finite,
            flat.shape[0] - finite,
        ]  # in slot order ENTROPY, Z, LOGIT_TOKENS, NONFINITE_LOGITS
        self.sums[_LOGITS].add_(torch.stack(values).to(self.sums.dtype))
        self._probs, self._probs_ok = p, ok

    def add_routing(self, routing: Routing) -> None:
        """Slots per expert, weights, capacity drops and invalid ids from one call's routing."""
        index = routing.index
        self._on(index.device)
        self.tokens += routing.tokens
        flat = index.reshape(-1).long()  # int32 ids from some routers: scatter and gather take int64
        bins = flat.clamp(-1, self.width).add_(1)
        dropped = weight = nonfinite = topk_prob = prob_tokens = self._zero
        if routing.kept is not None:  # capacity: what was asked for, and what survived
            self.capacity = True
            self.requested.scatter_add_(0, bins, self._ones_like(bins.numel()))
            kept = routing.kept.reshape(-1, routing.kept.shape[-1])
            self.assigned[1 : kept.shape[-1] + 1].add_(kept.sum(dim=0))
            dropped = (kept.sum(dim=-1) == 0).sum(dtype=torch.float32)
        elif routing.sizes is not None:  # already on the host (the router counted): stays there, no copy
            self.host_assigned = [a + b for a, b in zip(self.host_assigned, routing.sizes)]
        else:
            self.assigned.scatter_add_(0, bins, self._ones_like(bins.numel()))
        if routing.weights is not None:
            per_token = routing.weights.detach().float().reshape(index.shape[0], -1).sum(dim=-1)
            good = torch.isfinite(per_token)
            weight = torch.where(good, per_token, 0.0).sum()
            nonfinite = per_token.shape[0] - good.sum(dtype=torch.float32)
        probs, ok = self._probs, self._probs_ok
        if probs is not None and probs.shape[0] == index.shape[0] and probs.shape[-1] >= self.width:
            chosen = probs.gather(1, flat.clamp(0, self.width - 1).view(index.shape)).sum(dim=-1)
            topk_prob = torch.where(ok, chosen, 0.0).sum()
            prob_tokens = ok.sum(dtype=torch.float32)
        self._probs = self._probs_ok = None
        values = [dropped, weight, nonfinite, topk_prob, prob_tokens]  # slot order of _ROUTING
        self.sums[_ROUTING].add_(torch.stack(values).to(self.sums.dtype))

    def capture_top1(self, routing: Routing) -> None:
        self.top1 = routing.top1().detach()

    def compare_top1(self, previous: torch.Tensor | None) -> None:
        """Share of tokens whose top-1 differs from ``previous`` (same input, earlier check)."""
        if previous is not None and self.top1 is not None and previous.shape == self.top1.shape:
            self.changed = (previous != self.top1).float().mean()
        else:
            self.changed = None

    # -- read back ---------------------------------------------------------------------------
    def device_tensors(self) -> list[torch.Tensor]:
        """The accumulators in :meth:`unpack` order; empty before any observation."""
        return [] if self._device is None else [self.assigned, self.requested, self.sums]

    def unpack(self, assigned: list[int], requested: list[int], sums: list[float]) -> LayerCounts:
        w = self.width
        bins = requested if self.capacity else assigned
        return LayerCounts(
            path=self.path,
            num_experts=self.num_experts,
            top_k=self.top_k,
            zero_experts=self.zero_experts,
            tokens=self.tokens,
            assigned=[a + b for a, b in zip(assigned[1 : w + 1], self.host_assigned)],
            requested=requested[1 : w + 1] if self.capacity else [],
            dropped_tokens=round(sums[DROPPED]),
            weight_sum=sums[WEIGHT],
            logit_tokens=round(sums[LOGIT_TOKENS]),
            entropy_sum=sums[ENTROPY],
            z_sum=sums[Z],
            prob_tokens=round(sums[PROB_TOKENS]),
            topk_prob_sum=sums[TOPK_PROB],
            nonfinite=round(
                sums[NONFINITE_LOGITS] if sums[LOGIT_TOKENS] + sums[NONFINITE_LOGITS] else sums[NONFINITE_WEIGHTS]
            ),
            invalid=bins[0] + bins[w + 1],
        )

    def empty_counts(self) -> LayerCounts:
        return LayerCounts(
            path=self.path, num_experts=self.num_experts, top_k=self.top_k, zero_experts=self.zero_experts
        )


def read_counts(counters: list[LayerCounter]) -> list[LayerCounts]:
    """Every layer's counts, moved to the host in one transfer per (device, dtype): the only sync."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for c in counters:
        for t in c.device_tensors():
            groups.setdefault((t.device, t.dtype), []).append(t)
    host = {key: iter(torch.cat(ts).tolist()) for key, ts in groups.items()}
    out = []
    for c in counters:
        tensors = c.device_tensors()
        if not tensors:
            out.append(c.empty_counts())
            continue
        assigned, requested, sums = ([next(host[(t.device, t.dtype)]) for _ in range(t.numel())] for t in tensors)
        out.append(c.unpack(assigned, requested, sums))
    return out


def read_changed(counters: list[LayerCounter]) -> list[float | None]:
    """The stability figure of every layer (one transfer)."""
    present = [c.changed for c in counters if c.changed is not None]
    values = iter(torch.stack([t.to(present[0].device) for t in present]).tolist()) if present else iter(())
    return [next(values) if c.changed is not None else None for c in counters]
