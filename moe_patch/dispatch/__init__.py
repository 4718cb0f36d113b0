"""Dispatch maths: pure functions (see :mod:`.core`) and the fused-experts maths (:mod:`.experts`); the registered
``moe_patch`` experts implementation is :mod:`moe_patch.families.implementation`."""

from .core import DispatchPlan, dispatch_combine, grouped_linear, plan_dispatch
from .experts import fused_expert_forward

__all__ = [
    "DispatchPlan",
    "dispatch_combine",
    "fused_expert_forward",
    "grouped_linear",
    "plan_dispatch",
]
