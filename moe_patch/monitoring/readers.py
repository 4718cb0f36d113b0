"""Read a block's routing out of what its hooks see: tensors in, a :class:`Routing` out.

Each reader knows one call convention (taken from transformers 5.23's sources):

- ``experts_call``: the experts are called as ``experts(hidden, top_k_index, top_k_weights)`` (the 64
  decorated families, step3p7, LongCat-Flash, DBRX): the forward pre-hook sees the routing itself.
- ``capacity``: Switch Transformers / NLLB-MoE routers return ``(dispatch mask, probabilities, logits)``
  after expert capacity is applied.
- ``dense_scores``: Llama 4's router returns ``(scores, logits)``: sigmoid of the top-k logits, 0 elsewhere.
- ``sorted_plan``: JetMoE's router returns its expert-sorted plan ``(slot order, token ids, gates,
  expert sizes, logits)``.
- ``router_table``: ModuleList blocks (4.x / remote code): the router returns either ``(top_k_index,
  top_k_weights, ...)`` or logits, from which the top-k is taken as the block's detected routing does.

No reader synchronises with the device: every result stays a device tensor (JetMoE's expert sizes are
already a host list, made by transformers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..detect.spec import RoutingSpec

#: Routing kinds whose scores are sigmoids (their distribution is the normalised sigmoid scores).
SIGMOID_KINDS = ("sigmoid", "sigmoid_topk")


@dataclass
class Routing:
    """One call's routing.

    Attributes:
        index: ``[T, k]`` chosen expert per slot; for capacity families, what the router asked for
            before capacity.
        weights: tensor whose row sums are the routing weight each token's output gets (``[T, k]``,
            or ``[T, E]`` combine weights for capacity families); None when the call does not show it.
        kept: capacity families: ``[T, E]`` 0/1 dispatch after capacity.
        sizes: slots per expert already on the host (JetMoE's router computes them itself).
    """

    index: torch.Tensor
    weights: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    sizes: list[int] | None = None

    @property
    def tokens(self) -> int:
        return int(self.index.shape[0])

    def top1(self) -> torch.Tensor:
        """``[T]`` the expert each token relies on most: the largest weight's slot (or the first slot)."""
        if self.weights is not None and self.weights.shape == self.index.shape and self.index.shape[1] > 1:
            return self.index.gather(1, self.weights.argmax(dim=-1, keepdim=True)).squeeze(1)
        return self.index[:, 0]


def tensors_of(output: Any) -> list[torch.Tensor]:
    items = output if isinstance(output, (tuple, list)) else [output]
    return [t for t in items if isinstance(t, torch.Tensor)]


def pick_logits(output: Any, index: int | None, width: int) -> torch.Tensor | None:
    """The router logits in a module's output: ``output[index]`` when transformers' output recorder says
    where they are, else the first floating tensor with one column per expert."""
    if index is not None:
        items = output if isinstance(output, (tuple, list)) else [output]
        t = items[index] if -len(items) <= index < len(items) else None
        return t if isinstance(t, torch.Tensor) and t.is_floating_point() else None
    return next((t for t in tensors_of(output) if t.is_floating_point() and t.dim() > 0 and t.shape[-1] == width), None)


def experts_call(args: tuple, kwargs: dict, names: tuple[str, str]) -> Routing | None:
    """``experts(hidden, top_k_index, top_k_weights)``, positional or by keyword."""
    index = args[1] if len(args) > 1 else kwargs.get(names[0])
    weights = args[2] if len(args) > 2 else kwargs.get(names[1])
    if not isinstance(index, torch.Tensor) or index.is_floating_point():
        return None
    index = index.reshape(-1, index.shape[-1]) if index.dim() > 1 else index.reshape(-1, 1)
    if isinstance(weights, torch.Tensor) and weights.numel() == index.numel():
        weights = weights.reshape(index.shape)
    else:
        weights = None
    return Routing(index=index, weights=weights)


def capacity(output: Any, num_experts: int, top_k: int, logits: torch.Tensor | None) -> Routing | None:
    """Switch: ``(one-hot kept [.., E], top-1 probability [.., 1], logits)``; NLLB-MoE: ``(top-1 mask,
    combine weights [T, E], logits)``. What was asked for is the top-k of the logits (the routers'
    own choice before capacity); what was kept is the dispatch the router returned."""
    items = tensors_of(output)
    if logits is None or len(items) < 2:
        return None
    flat = logits.reshape(-1, logits.shape[-1])
    index = torch.topk(flat, top_k, dim=-1).indices
    mask, second = items[0], items[1]
    if second.is_floating_point() and second.shape[-1] == num_experts:  # NLLB-MoE: combine weights
        combine = second.reshape(-1, num_experts)
        return Routing(index=index, weights=combine, kept=(combine > 0).to(torch.long))
    kept = mask.reshape(-1, num_experts).to(torch.long)  # Switch: capacity-masked one-hot dispatch
    weights = second.reshape(-1, 1) * kept.sum(dim=-1, keepdim=True).to(second.dtype)
    return Routing(index=index, weights=weights, kept=kept)


def dense_scores(output: Any, top_k: int) -> Routing | None:
    """Llama 4: ``(scores [T, E], logits [T, E])``; the chosen experts are the logits' top-k (as the router
    computes them), their weights the scores there."""
    items = tensors_of(output)
    if len(items) < 2:
        return None
    scores, logits = items[0], items[1]
    scores, logits = scores.reshape(-1, scores.shape[-1]), logits.reshape(-1, logits.shape[-1])
    index = torch.topk(logits, top_k, dim=-1).indices
    return Routing(index=index, weights=scores.gather(1, index))


def sorted_plan(output: Any, top_k: int) -> Routing | None:
    """JetMoE: ``(slot order, token ids, gates, expert sizes, logits)``, slot ``s = token * k + j`` sorted
    by expert. The ``[T, k]`` table is the logits' top-k (the router's own call) and the gates scattered
    back; the per-expert sizes are already a host list (transformers' router made it)."""
    if not isinstance(output, (tuple, list)) or len(output) < 5:
        return None
    order, _, gates, sizes, logits = output[:5]
    if not isinstance(sizes, (list, tuple)):
        return None
    index = logits.topk(top_k, dim=1).indices
    weights = torch.empty_like(gates).scatter_(0, order, gates).view(-1, top_k)
    return Routing(index=index, weights=weights, sizes=[int(s) for s in sizes])


def router_table(
    output: Any, spec: RoutingSpec, num_experts: int, top_k: int, logits: torch.Tensor | None
) -> Routing | None:
    """ModuleList blocks: the router's own ``(top_k_index, top_k_weights)`` when it returns them, else
    the top-k of its logits under the block's detected routing kind."""
    items = [t for t in tensors_of(output) if t.dim() > 0]
    index = next((t for t in items if not t.is_floating_point() and t.shape[-1] == top_k), None)
    if index is not None:
        index = index.reshape(-1, top_k)
        weights = next((t for t in items if t.is_floating_point() and t.numel() == index.numel()), None)
        return Routing(index=index, weights=None if weights is None else weights.reshape(index.shape))
    if logits is None:
        return None
    flat = logits.reshape(-1, num_experts).float()
    if spec.kind in SIGMOID_KINDS:
        weights, index = torch.topk(torch.sigmoid(flat), top_k, dim=-1)
    elif spec.kind == "topk_softmax":
        weights, index = torch.topk(flat, top_k, dim=-1)
        weights = F.softmax(weights, dim=-1)
    else:
        weights, index = torch.topk(F.softmax(flat, dim=-1), top_k, dim=-1)
    if spec.normalized and spec.kind != "topk_softmax":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(index=index, weights=weights * spec.scaling_factor)
