"""Read a router's behaviour off the module: its attributes first, its source code as a fallback.

Works on any device, ``meta`` included, because nothing is computed.
"""

from __future__ import annotations

import inspect
import re
from functools import lru_cache

import torch

from .spec import RoutingSpec


def _attr(modules: tuple[torch.nn.Module | None, ...], *names: str):
    for m in modules:
        if m is None:
            continue
        for n in names:
            v = getattr(m, n, None)
            if v is not None and not callable(v):
                return v
            cfg = getattr(m, "config", None)
            v = getattr(cfg, n, None) if cfg is not None else None
            if v is not None and not callable(v):
                return v
    return None


@lru_cache(maxsize=512)
def _forward_source(cls: type) -> str:
    """Source of the methods that route (forward and helpers it may call), comments stripped."""
    parts = []
    for name, fn in vars(cls).items():
        if callable(fn) and name != "__init__" and not name.startswith("__"):
            try:
                parts.append(inspect.getsource(fn))
            except (OSError, TypeError):
                pass
    return re.sub(r"#.*", "", "\n".join(parts))


_CALLS = {
    "softmax": re.compile(r"softmax\("),
    "sigmoid": re.compile(r"sigmoid\("),
    "topk": re.compile(r"\btopk\(|\.topk\(|torch\.topk\("),
    "capacity": re.compile(r"expert_capacity"),
}


def _kind_from_source(src: str) -> str:
    pos = {}
    for name, rx in _CALLS.items():
        m = rx.search(src)
        pos[name] = m.start() if m else -1
    if pos["capacity"] >= 0:
        return "capacity"
    if pos["sigmoid"] >= 0 and (pos["softmax"] < 0 or pos["sigmoid"] < pos["softmax"]):
        return "sigmoid_topk" if 0 <= pos["topk"] < pos["sigmoid"] else "sigmoid"
    if pos["softmax"] >= 0:
        return "topk_softmax" if 0 <= pos["topk"] < pos["softmax"] else "softmax_topk"
    return "other"


def _renormalises(src: str) -> bool | None:
    if re.search(r"/=\s*[\w.]+\.sum\(|/\s*[\w.]+\.sum\(dim=-1|denominator", src):
        return True
    return None


def infer_routing(router: torch.nn.Module | None, block: torch.nn.Module, experts: torch.nn.Module) -> RoutingSpec:
    """Describe how ``router`` (inside ``block``) picks and weighs experts."""
    mods = (router, block, experts)
    kind = _kind_from_source(_forward_source(type(router))) if router is not None else "other"
    if kind == "other":
        kind = _kind_from_source(_forward_source(type(block)))
    src = "".join(_forward_source(type(m)) for m in (router, block) if m is not None)
    norm = _attr(mods, "norm_topk_prob", "moe_normalize_expert_weights", "normalize_router_prob_before_dropping")
    normalized = bool(norm) if norm is not None else _renormalises(src)
    if kind == "topk_softmax":
        normalized = True  # softmax over the chosen k sums to one by construction
    scale = _attr(mods, "routed_scaling_factor", "moe_router_scaling_factor", "router_scaling_factor")
    groups = _attr(mods, "n_group", "num_group", "num_expert_group")
    topk_groups = _attr(mods, "topk_group", "num_limited_groups")
    zero = _attr(mods, "zero_expert_num")
    has_bias = any(m is not None and hasattr(m, "e_score_correction_bias") for m in mods)
    return RoutingSpec(
        kind=kind,
        normalized=normalized,
        scaling_factor=float(scale) if isinstance(scale, (int, float)) else 1.0,
        correction_bias=has_bias,
        groups=int(groups) if isinstance(groups, int) else None,
        topk_groups=int(topk_groups) if isinstance(topk_groups, int) else None,
        zero_experts=int(zero) if isinstance(zero, int) else 0,
    )


TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_top_k", "top_k_experts", "num_selected_experts", "moe_k", "topk")


def infer_top_k(router: torch.nn.Module | None, block: torch.nn.Module, experts: torch.nn.Module) -> int | None:
    """top-k from the router, block or experts module, then from their configs."""
    v = _attr((router, block, experts), *TOP_K_NAMES)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        from ..errors import MoEConfigError

        raise MoEConfigError(f"{type(router or block).__name__}: top_k must be an integer, got {v!r}")
    return v
