"""Walk a model and find its MoE blocks by structure (parameter shapes and attributes, not names)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import MoEConfigError, NotAModelError
from .routing import infer_routing, infer_top_k
from .spec import MoEBlock, MoEReport, RoutingSpec

logger = logging.getLogger(__name__)


@dataclass
class BlockHandle:
    """A detected block together with the live modules it describes."""

    info: MoEBlock
    block: torch.nn.Module
    experts: torch.nn.Module
    router: torch.nn.Module | None
    adapter: object  # moe_patch.adapters.base.Adapter


def model_root(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose module paths moe-patch reports: a peft ``PeftModel``'s base model."""
    if not isinstance(model, torch.nn.Module):
        raise NotAModelError(
            f"expected a model (torch.nn.Module), got {type(model).__name__} {model!r:.80}. For a checkpoint folder or "
            "Hub repo id, run `moe-patch inspect PATH`, or load it first (AutoModelForCausalLM.from_pretrained)."
        )
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _family(model: torch.nn.Module, *modules: torch.nn.Module | None) -> str:
    for m in modules:
        cfg = getattr(m, "config", None) if m is not None else None
        if cfg is not None and getattr(cfg, "model_type", None):
            return str(cfg.model_type)
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", "") or "")


def _candidate_weights(child: torch.nn.Module):
    """The child's own 2-D weight, or those of its direct sub-modules (DBRX's router.layer): a router
    is never deeper, and never inside a list of layers."""
    w = child._parameters.get("weight")
    if w is not None:
        yield w
    if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
        return
    for sub in child.children():
        w = sub._parameters.get("weight")
        if w is not None:
            yield w


def find_router(block: torch.nn.Module, experts_name: str, num_experts: int, hidden: int,
                extra: int = 0) -> tuple[str | None, torch.nn.Module | None]:
    """The sibling of the experts whose 2-D weight maps hidden -> one logit per expert."""
    best: tuple[int, str, torch.nn.Module] | None = None
    for child_name, child in block.named_children():
        if child_name == experts_name:
            continue
        for w in _candidate_weights(child):
            if w.dim() == 2 and w.shape[-1] == hidden and w.shape[0] in (num_experts, num_experts + extra):
                # Prefer the conventional names when several siblings fit (the report shows the router).
                score = 0 if any(k in child_name for k in ("gate", "router")) else 1
                if best is None or score < best[0]:
                    best = (score, child_name, child)
    return (best[1], best[2]) if best else (None, None)


def _shared(block: torch.nn.Module, skip: set[str]) -> tuple[tuple[str, ...], int]:
    names, params = [], 0
    for child_name, child in block.named_children():
        if child_name in skip or "shared" not in child_name:
            continue
        names.append(child_name)
        params += sum(p.numel() for p in child.parameters())
    return tuple(names), params


def find_moe_blocks(model: torch.nn.Module) -> list[BlockHandle]:
    """Every MoE block of ``model`` (any device, ``meta`` included), in module order."""
    from ..adapters import ADAPTERS

    model = model_root(model)
    handles: list[BlockHandle] = []
    claimed: set[int] = set()
    for block_path, block in model.named_modules():
        for child_name, child in block.named_children():
            if id(child) in claimed:
                continue
            adapter = next((a for a in ADAPTERS if a.match(block, child_name, child)), None)
            if adapter is None:
                continue
            handle = _describe(model, block_path, block, child_name, child, adapter)
            if handle is not None:
                claimed.add(id(child))
                handles.append(handle)
    return handles


def _describe(model, block_path, block, experts_name, experts, adapter) -> BlockHandle | None:
    num_experts = adapter.num_experts(experts)
    hidden, inter = adapter.sizes(experts)
    extra = int(getattr(experts, "zero_expert_num", 0) or 0)
    router_name, router = find_router(block, experts_name, num_experts, hidden, extra)
    if adapter.routing_kind:
        routing = RoutingSpec(kind=adapter.routing_kind)
    else:
        routing = infer_routing(router, block, experts)
    top_k = adapter.fixed_top_k or infer_top_k(router, block, experts)
    if top_k is None:
        top_k = _config_top_k(model)
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
    shared_names, shared_params = _shared(block, skip)
    weights = [p for p in experts.parameters()]
    info = MoEBlock(
        path=block_path,
        experts_path=prefix + experts_name,
        router_path=(prefix + router_name) if router_name else None,
        shared_paths=tuple(prefix + n for n in shared_names),
        family=_family(model, experts, block),
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
    )
    return BlockHandle(info=info, block=block, experts=experts, router=router, adapter=adapter)


def _config_top_k(model: torch.nn.Module) -> int | None:
    from .routing import TOP_K_NAMES

    cfg = getattr(model, "config", None)
    configs = [cfg] + [getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {}] if cfg else []
    for c in configs:
        for n in TOP_K_NAMES:
            v = getattr(c, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def validate_moe_shape(where: str, num_experts, top_k, zero_experts: int = 0) -> None:
    """Raise :class:`MoEConfigError` naming the field when experts/top-k cannot form an MoE."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise MoEConfigError(f"{where}: num_experts must be a positive integer, got {num_experts!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise MoEConfigError(f"{where}: top_k (num_experts_per_tok) must be an integer >= 1, got {top_k!r}")
    if top_k > num_experts + zero_experts:
        raise MoEConfigError(
            f"{where}: top_k (num_experts_per_tok) = {top_k} exceeds num_experts = {num_experts + zero_experts}"
        )


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
        family=_family(model),
        blocks=[h.info for h in handles],
        total_params=total,
        bytes_by_dtype=by_dtype,
    )
