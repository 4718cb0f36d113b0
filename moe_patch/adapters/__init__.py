"""The explicit registry of adapters, tried in order for every (block, child) pair of a model.

A new layout gets a new adapter here; detection and patching need no other change.
"""

from __future__ import annotations

from .base import Adapter, PatchOptions
from .dbrx import DbrxAdapter
from .doge import ProductKeyExpertsAdapter
from .fused import ExpertsInterfaceAdapter, PlainFusedAdapter, ZeroExpertsAdapter
from .jetmoe import JetMoeAdapter
from .llama4 import Llama4Adapter
from .module_list import ModuleListAdapter, RoutedListAdapter
from .vitpose import PerImageExpertsAdapter

ADAPTERS: list[Adapter] = [
    ExpertsInterfaceAdapter(),  # 64 transformers families: transformers' own experts registry
    ZeroExpertsAdapter(),  # LongCat-Flash
    PlainFusedAdapter(),  # fused experts without the decorator (step3p7)
    Llama4Adapter(),
    DbrxAdapter(),
    JetMoeAdapter(),
    RoutedListAdapter(),  # Switch Transformers, NLLB-MoE
    ModuleListAdapter(),  # 4.x-style and remote-code models
    PerImageExpertsAdapter(),  # ViTPose+: one expert per dataset, chosen per image
    ProductKeyExpertsAdapter(),  # Doge: detected and reported, declines to patch
]

__all__ = ["ADAPTERS", "Adapter", "PatchOptions"]
