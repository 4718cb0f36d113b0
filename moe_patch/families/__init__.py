"""Families: each layout of experts moe-patch recognises and drives, resident and offloaded, one file each,
and the explicit registry tried in order for every (block, child) pair of a model.

A new layout is a :class:`~.base.Family` subclass in a file of its own and one entry in ``FAMILIES``
(:mod:`.registry`); detection, patching and offloading need no other change.
"""

from __future__ import annotations

from .base import ExpertTensors, Family, PatchOptions, ResidentRunner, Runner, run_experts
from .find import find_moe_blocks, inspect_model
from .registry import FAMILIES
from .unsupported import UNSUPPORTED, is_supported

__all__ = [
    "FAMILIES",
    "UNSUPPORTED",
    "ExpertTensors",
    "Family",
    "PatchOptions",
    "ResidentRunner",
    "Runner",
    "find_moe_blocks",
    "inspect_model",
    "is_supported",
    "run_experts",
]
