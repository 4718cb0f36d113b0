"""Find and describe MoE blocks: :func:`inspect_model`, :func:`find_moe_blocks`."""

from .finder import BlockHandle, find_moe_blocks, inspect_model, validate_moe_shape
from .spec import ExpertLayout, MoEBlock, MoEReport, RoutingSpec

__all__ = [
    "BlockHandle",
    "ExpertLayout",
    "MoEBlock",
    "MoEReport",
    "RoutingSpec",
    "find_moe_blocks",
    "inspect_model",
    "validate_moe_shape",
]
