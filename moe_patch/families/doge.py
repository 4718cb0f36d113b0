"""Doge's CDMoE: "retrieval" experts of one neuron each (rows of two embedding tables), picked by a
product-key router. Detected and reported; not patched: transformers already computes it with one
gather and two batched matmuls, there is no per-expert dispatch to make faster."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from .base import Family, PatchOptions

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle


def _tables(block: torch.nn.Module) -> list[tuple[str, torch.nn.Embedding]]:
    return [(n, m) for n, m in block.named_children() if isinstance(m, torch.nn.Embedding)]


class ProductKeyExpertsFamily(Family):
    name = "product_key"
    offload_unsupported = "single-neuron retrieval experts (rows of two embedding tables) are not paged per expert"
    routing_kind = "product_key"

    def match(self, block, name, experts) -> bool:
        tables = _tables(block)
        if len(tables) != 2 or tables[0][0] != name:
            return False
        (_, down), (_, up) = tables
        n = down.num_embeddings
        keys = math.isqrt(n)
        has_router = any(isinstance(m, torch.nn.Linear) and m.out_features == 2 * keys for m in block.children())
        return down.weight.shape == up.weight.shape and keys * keys == n and has_router

    def num_experts(self, experts) -> int:
        return int(experts.num_embeddings)

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts.embedding_dim), 1

    def params_per_expert(self, experts) -> int:
        return 2 * int(experts.embedding_dim)

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(storage="embedding_rows", gated=False, param_names=("down_embed", "up_embed"))

    def install(self, handle: BlockHandle, options: PatchOptions) -> str:
        return "single-neuron retrieval experts are already computed in one batched gather; nothing to dispatch"
