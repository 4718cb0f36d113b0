"""Walk a model and find its MoE blocks by structure (parameter shapes and attributes, not names): each
(block, child) pair is offered to the registered families in order; the first whose ``match`` says yes
describes the block and drives it.
"""

from __future__ import annotations

import logging

import torch

from ..detect.routing import infer_routing, infer_top_k
from ..detect.spec import BlockHandle, MoEBlock, MoEReport, RoutingSpec
from ..detect.structure import config_top_k, find_router, model_family, model_root, shared_experts, validate_moe_shape
from .base import Family
from .registry import FAMILIES

logger = logging.getLogger(__name__)


def find_moe_blocks(model: torch.nn.Module) -> list[BlockHandle]:
    """Every MoE block of ``model`` (any device, ``meta`` included), in module order."""
    model = model_root(model)
    handles: list[BlockHandle] = []
    claimed: set[int] = set()
    for block_path, block in model.named_modules():
        for child_name, child in block.named_children():
            if id(child) in claimed:
                continue
            adapter = next((a for a in FAMILIES if a.match(block, child_name, child)), None)
            if adapter is None:
                continue
            handle = _describe(model, block_path, block, child_name, child, adapter)
            if handle is not None:
                claimed.add(id(child))
                handles.append(handle)
    return handles


def zero_experts(block: torch.nn.Module, experts: torch.nn.Module) -> int:
    """LongCat-Flash's identity experts: counted by its experts module (transformers 5.23) or, since 5.25, by the
    block, which maps them to weight-0 routed ids before the experts run."""
    return int(getattr(experts, "zero_expert_num", 0) or getattr(block, "zero_expert_num", 0) or 0)


def _describe(model, block_path, block, experts_name, experts, adapter: Family) -> BlockHandle | None:
    num_experts = adapter.num_experts(experts)
    hidden, inter = adapter.sizes(experts)
    extra = zero_experts(block, experts)
    router_name, router = find_router(block, experts_name, num_experts, hidden, extra)
    if adapter.routing_kind:
        routing = RoutingSpec(kind=adapter.routing_kind)
    else:
        routing = infer_routing(router, block, experts)
    top_k = adapter.fixed_top_k or infer_top_k(router, block, experts)
    if top_k is None:
        top_k = config_top_k(model)
    prefix = block_path + "." if block_path else ""
    if top_k is None and routing.kind == "capacity":
        top_k = 1  # Switch Transformers' top-1 capacity router
    if top_k is None and adapter.name == "module_list":
        # Structure alone matched (a list of MLPs next to a hidden -> N linear), but nothing says how
        # many experts a token picks: not an MoE we can describe, e.g. a classifier head beside layers.
        logger.debug("ignoring %s.%s: list of MLPs without a top-k", block_path, experts_name)
        return None
    if routing.kind == "capacity" and hasattr(router, "second_expert_policy"):
        top_k = 2  # NLLB-MoE's top-2 capacity router
    validate_moe_shape(f"{prefix}{experts_name}", num_experts, top_k, extra)
    skip = {experts_name, router_name or ""}
    shared_names, shared_params = shared_experts(block, skip)
    weights = [p for p in experts.parameters()]
    info = MoEBlock(
        path=block_path,
        experts_path=prefix + experts_name,
        router_path=(prefix + router_name) if router_name else None,
        shared_paths=tuple(prefix + n for n in shared_names),
        family=model_family(model, experts, block),
        adapter=adapter.name,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=int(hidden),
        intermediate_size=int(inter),
        layout=adapter.layout(experts),
        routing=routing,
        params_per_expert=adapter.params_per_expert(experts),
        shared_params=shared_params,
        router_params=sum(p.numel() for p in router.parameters()) if router is not None else 0,
        dtype=str(weights[0].dtype).replace("torch.", "") if weights else "",
        zero_experts=extra,
    )
    return BlockHandle(info=info, block=block, experts=experts, router=router, family=adapter)


def inspect_model(model: torch.nn.Module) -> MoEReport:
    """Describe every MoE block of a live model (any device, ``meta`` included).

    Returns a :class:`MoEReport` (``print(report)`` for a table, ``report.to_json()`` for JSON). A model
    without MoE blocks gives an empty report (``report.has_moe`` is False); nothing is changed.
    """
    model = model_root(model)
    handles = find_moe_blocks(model)
    seen: set[int] = set()
    total = 0
    by_dtype: dict[str, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, torch.nn.Parameter):
            total += t.numel()
        key = str(t.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    return MoEReport(
        model_class=type(model).__name__,
        family=model_family(model),
        blocks=[h.info for h in handles],
        total_params=total,
        bytes_by_dtype=by_dtype,
    )
