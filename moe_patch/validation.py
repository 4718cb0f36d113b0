"""Checks on router output before dispatch: a bad router must fail loudly, naming the layer."""

from __future__ import annotations

import math

import torch

from .errors import RoutingError

_SMALL = 64  # routing slots up to which the CPU check reads them to Python instead of reducing on tensors

#: Attribute set on patched modules: the module path used in error messages, and whether to check.
NAME_ATTR = "_moe_patch_name"
VALIDATE_ATTR = "_moe_patch_validate"


def routing_summary(
    module: torch.nn.Module, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor | None:
    """``[min id, max id, all weights finite]`` as a float64 tensor on the routing's device, not read back
    (a caller that makes a host transfer anyway appends it to that one); None when the check is off."""
    if not getattr(module, VALIDATE_ATTR, True) or torch.compiler.is_compiling() or top_k_index.numel() == 0:
        return None
    return torch.stack(
        [
            top_k_index.min().to(torch.float64),
            top_k_index.max().to(torch.float64),
            torch.isfinite(top_k_weights).all().to(torch.float64),
        ]
    )


def check_summary(module: torch.nn.Module, summary: list[float], num_experts: int | None = None) -> None:
    """Raise :class:`RoutingError` for a :func:`routing_summary` read back to the host."""
    name = getattr(module, NAME_ATTR, type(module).__name__)
    num_experts = int(module.num_experts if num_experts is None else num_experts)
    lo, hi, finite = summary
    if getattr(module, "_is_expert_parallel", False):
        hi = min(hi, num_experts - 1)  # ids >= E are expert-parallel sentinels with zero weight, by design
    if lo < 0 or hi >= num_experts:
        raise RoutingError(
            f"{name}: router chose expert index {int(lo if lo < 0 else hi)}, outside [0, {num_experts}). "
            "The router weights or config.num_experts_per_tok/num_experts are inconsistent."
        )
    if not finite:
        raise RoutingError(
            f"{name}: non-finite routing weights (NaN or inf) from the router. Check the router weights "
            "and the layer input for overflow (fp16?), or load in bf16/fp32."
        )


def check_routing(
    module: torch.nn.Module, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int | None = None
) -> None:
    """Raise :class:`RoutingError` on non-finite routing weights or expert indices outside ``[0, E)``.

    Costs one host sync per block; ``patch_model(model, validate=False)`` turns it off for speed.
    Skipped while compiling (a data-dependent branch would break the graph).
    """
    if top_k_index.device.type == "cpu":  # no sync to save: read the values (few) or three reductions
        if not getattr(module, VALIDATE_ATTR, True) or torch.compiler.is_compiling() or top_k_index.numel() == 0:
            return
        if top_k_index.numel() <= _SMALL and top_k_weights.numel() <= _SMALL:  # decode: Python beats 4 tensor ops
            ids, weights = top_k_index.reshape(-1).tolist(), top_k_weights.reshape(-1).tolist()
            check_summary(module, [min(ids), max(ids), all(map(math.isfinite, weights))], num_experts)
            return
        lo, hi = torch.aminmax(top_k_index)
        check_summary(module, [lo.item(), hi.item(), bool(torch.isfinite(top_k_weights).all())], num_experts)
        return
    summary = routing_summary(module, top_k_index, top_k_weights)
    if summary is not None:
        check_summary(module, summary.tolist(), num_experts)  # one host sync for the three checks
