"""Describe MoE blocks: the dataclasses of a report, routing read off a router, structural facts about a
model's modules, config.json and checkpoint summaries. Finding the blocks is the families' job
(:func:`moe_patch.families.find_moe_blocks`, :func:`moe_patch.inspect_model`), since each family says what
its experts look like.
"""

from .spec import BlockHandle, ExpertLayout, MoEBlock, MoEReport, RoutingSpec
from .structure import model_root, validate_moe_shape

__all__ = ["BlockHandle", "ExpertLayout", "MoEBlock", "MoEReport", "RoutingSpec", "model_root", "validate_moe_shape"]
