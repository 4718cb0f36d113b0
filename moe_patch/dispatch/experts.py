"""Expert maths for transformers' fused experts layout, and the moe-patch experts forward.

transformers 5 stores the experts of a block as 3-D parameters on one module decorated with
``@use_experts_implementation``: ``gate_up_proj [E, 2I, H]`` ([gate; up] rows, or interleaved, or
``[E, H, 2I]`` when ``is_transposed``), ``down_proj [E, H, I]``, optional ``*_bias``, or ``up_proj``
alone when ``has_gate`` is False. The module's own ``_apply_gate`` does the gating (clamped or
soft-capped SwiGLU in some families, interleaved split in gpt_oss), so it is always called here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import (
    DispatchPlan,
    combine_sorted,
    dispatch_combine,
    grouped_linear,
    grouped_mm_supported,
    plan_dispatch,
)

#: Below this many slots per active expert the per-expert loop wins over one grouped GEMM on CPU:
#: the grouped kernel pays for every expert's offsets and a gather/scatter of all slots, the loop
#: only calls one GEMM per active expert on weight views (no copy). Measured in bench/dispatch.py.
LOOP_MAX_ROWS_PER_EXPERT = 4


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x @ W`` for one expert's weight in nn.Linear layout ``[out, in]`` or transposed ``[in, out]``."""
    if transposed:
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def fused_expert_forward(module: torch.nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert of a fused-experts module on rows ``x``.

    ``weights`` holds that expert's slices, keyed like the module's parameters
    (``gate_up_proj``/``up_proj``, ``down_proj``, optional ``*_bias``); the offload engine passes
    weights fetched from its caches, the resident path passes views of the module's parameters.
    """
    t = module.is_transposed
    x = x.to(weights["down_proj"].dtype)
    if module.has_gate:
        h = module._apply_gate(expert_linear(x, weights["gate_up_proj"], weights.get("gate_up_proj_bias"), t))
    else:
        h = module.act_fn(expert_linear(x, weights["up_proj"], weights.get("up_proj_bias"), t))
    y = expert_linear(h, weights["down_proj"], weights.get("down_proj_bias"), t)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return y


def expert_weight_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the per-expert parameters of a fused-experts module, in compute order."""
    names = ["gate_up_proj" if module.has_gate else "up_proj"]
    if module.has_bias:
        names.append(names[0] + "_bias")
    names += ["down_proj"] + (["down_proj_bias"] if module.has_bias else [])
    return tuple(names)


def resident_expert_weights(module: torch.nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """Views (no copy) of one expert's slices of the module's own parameters."""
    return {name: getattr(module, name)[expert] for name in expert_weight_names(module)}


def _grouped_fused_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, plan: DispatchPlan, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """All experts in two grouped GEMMs over expert-sorted rows."""
    offs = torch.cumsum(plan.counts, 0).to(torch.int32)
    t = module.is_transposed
    expert_of_row = torch.repeat_interleave(torch.arange(module.num_experts, device=plan.counts.device), plan.counts)
    rows = hidden_states[plan.token_ids[: plan.offsets[-1]]]
    first = "gate_up_proj" if module.has_gate else "up_proj"
    bias = getattr(module, first + "_bias")[expert_of_row] if module.has_bias else None
    h = grouped_linear(rows, getattr(module, first), offs, transposed=t, bias_rows=bias)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    bias = module.down_proj_bias[expert_of_row] if module.has_bias else None
    y = grouped_linear(h, module.down_proj, offs, transposed=t, bias_rows=bias)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return combine_sorted(y, plan, top_k_weights, hidden_states.shape[0]).to(hidden_states.dtype)


def moe_patch_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``moe_patch`` experts implementation, registered in transformers' experts registry.

    Picks per call between a loop over the active experts on weight views (decode, few rows per
    expert, training) and two grouped GEMMs (prefill), both exact against transformers' eager forward.
    """
    from ..validation import check_routing  # local: validation imports nothing from dispatch

    check_routing(self, top_k_index, top_k_weights)
    plan = plan_dispatch(top_k_index, self.num_experts)
    weight = self.gate_up_proj if self.has_gate else self.up_proj
    rows_per_expert = top_k_index.numel() / max(len(plan.active), 1)
    if rows_per_expert > LOOP_MAX_ROWS_PER_EXPERT and grouped_mm_supported(weight, hidden_states):
        return _grouped_fused_forward(self, hidden_states, plan, top_k_weights)
    return dispatch_combine(
        hidden_states,
        top_k_index,
        top_k_weights,
        self.num_experts,
        lambda e, x: fused_expert_forward(self, x, resident_expert_weights(self, e)),
        plan=plan,
    )
