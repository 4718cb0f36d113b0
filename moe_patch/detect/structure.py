"""Structural facts about a model's modules, read without knowing any family: the model root (a peft
wrapper's base model), the router beside a block's experts, its shared experts, the config's top-k, and the
sanity of an experts / top-k pair. Pure reading; nothing here imports the families that use it.
"""

from __future__ import annotations

import torch

from ..errors import MoEConfigError, NotAModelError
from .routing import TOP_K_NAMES


def model_root(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose module paths moe-patch reports: a peft ``PeftModel``'s base model."""
    if not isinstance(model, torch.nn.Module):
        raise NotAModelError(
            f"expected a model (torch.nn.Module), got {type(model).__name__} {model!r:.80}. For a checkpoint folder or "
            "Hub repo id, run `moe-patch inspect PATH`, or load it first (AutoModelForCausalLM.from_pretrained)."
        )
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_family(model: torch.nn.Module, *modules: torch.nn.Module | None) -> str:
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


def find_router(
    block: torch.nn.Module, experts_name: str, num_experts: int, hidden: int, extra: int = 0
) -> tuple[str | None, torch.nn.Module | None]:
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


def shared_experts(block: torch.nn.Module, skip: set[str]) -> tuple[tuple[str, ...], int]:
    names, params = [], 0
    for child_name, child in block.named_children():
        if child_name in skip or "shared" not in child_name:
            continue
        names.append(child_name)
        params += sum(p.numel() for p in child.parameters())
    return tuple(names), params


def config_top_k(model: torch.nn.Module) -> int | None:
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
