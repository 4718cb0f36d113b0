"""The explicit registry of families, tried in order for every (block, child) pair of a model: the first
whose ``match`` says yes describes and drives the block. Order matters where layouts overlap (the decorated
experts interface before the undecorated fused layouts; routed lists before plain lists)."""

from __future__ import annotations

from .base import Family
from .dbrx import DbrxFamily
from .doge import ProductKeyExpertsFamily
from .fused import ExpertsInterfaceFamily, PlainFusedFamily, ZeroExpertsFamily
from .jetmoe import JetMoeFamily
from .llama4 import Llama4Family
from .module_list import ModuleListFamily, RoutedListFamily
from .vitpose import PerImageExpertsFamily

FAMILIES: list[Family] = [
    ExpertsInterfaceFamily(),  # 64 transformers families: transformers' own experts registry
    ZeroExpertsFamily(),  # LongCat-Flash
    PlainFusedFamily(),  # fused experts without the decorator (step3p7)
    Llama4Family(),
    DbrxFamily(),
    JetMoeFamily(),
    RoutedListFamily(),  # Switch Transformers, NLLB-MoE
    ModuleListFamily(),  # 4.x-style and remote-code models
    PerImageExpertsFamily(),  # ViTPose+: one expert per dataset, chosen per image
    ProductKeyExpertsFamily(),  # Doge: detected and reported, declines to patch
]
