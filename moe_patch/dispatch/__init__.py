"""Dispatch maths: pure functions (see :mod:`.core`) and the fused-experts forward (:mod:`.experts`)."""

from .core import DispatchPlan, dispatch_combine, grouped_linear, plan_dispatch
from .experts import fused_expert_forward, moe_patch_experts_forward

__all__ = [
    "DispatchPlan",
    "dispatch_combine",
    "fused_expert_forward",
    "grouped_linear",
    "moe_patch_experts_forward",
    "plan_dispatch",
]
