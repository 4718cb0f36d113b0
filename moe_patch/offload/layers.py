"""The MoE blocks whose routed experts are offloaded, described as small records (no I/O, no mutation).

They come from detection (:func:`moe_patch.families.find_moe_blocks`): each block's family says which
per-expert tensors there are and how one expert is cut from them. Blocks whose family cannot be offloaded
stay resident, with the family's reason in a warning (and in the error when nothing is left to offload).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..detect.spec import BlockHandle, MoEBlock
from ..errors import NoMoEFoundError
from ..families import ExpertTensors, Family, find_moe_blocks
from ..families.fused import ZERO_EXPERTS_RESIDENT

logger = logging.getLogger(__name__)


@dataclass
class OffloadLayer:
    """One MoE block whose routed experts are offloaded.

    Attributes:
        index: position among the offloaded blocks (the prefetcher's notion of "next layer").
        handle: the detected block (its info, block, experts and router modules) and its family.
        tensors: the per-expert tensors the engine pages, read from the family before the weights left.
    """

    index: int
    handle: BlockHandle
    tensors: ExpertTensors

    @property
    def family(self) -> Family:
        return self.handle.family

    @property
    def info(self) -> MoEBlock:
        return self.handle.info

    @property
    def path(self) -> str:
        return self.handle.info.path

    @property
    def experts_path(self) -> str:
        return self.handle.info.experts_path

    @property
    def experts(self) -> nn.Module:
        return self.handle.experts

    @property
    def router(self) -> nn.Module | None:
        return self.handle.router

    @property
    def top_k(self) -> int:
        return self.handle.info.top_k

    @property
    def num_experts(self) -> int:
        return self.tensors.num_experts

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.tensors.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.tensors.shapes

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors.dtype

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in the model dtype."""
        return self.tensors.expert_bytes

    def expert_slice(self, full: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s part of one stacked parameter (a view)."""
        return self.family.expert_slice(full, e, self.num_experts)

    def stack(self, name: str, per_expert: list[torch.Tensor]) -> torch.Tensor:
        """The stacked parameter ``name`` from every expert's slice (inverse of :meth:`expert_slice`)."""
        return self.family.stack(per_expert)

    def parameter_paths(self) -> list[str]:
        """The parameters inside the experts module that hold this layer's experts."""
        return self.family.parameter_paths(self.experts, self.tensors)

    def expert_param_path(self, expert: int, name: str) -> str | None:
        """Expert ``expert``'s tensor ``name`` as a parameter of its own, or None (a row of ``name``)."""
        return self.family.expert_param_path(self.experts, expert, name)

    def compute_expert(self, expert: int, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expert ``expert`` on rows ``x`` from its fetched ``weights`` (decoded, on x's device)."""
        return self.family.compute_expert(self.experts, expert, x, weights)

    def slot_bank(self, weights: dict[str, torch.Tensor]):
        """The bank of this layer's maths over ``weights`` stacked ``[N, ...]`` (the engine's slots)."""
        return self.family.slot_bank(self.experts, weights)


def find_offload_layers(model: nn.Module, handles: list[Any] | None = None) -> list[OffloadLayer]:
    """The model's offloadable MoE blocks in forward order (from detection handles, found here if None)."""
    if handles and all(isinstance(h, OffloadLayer) for h in handles):
        return list(handles)
    handles = find_moe_blocks(model) if handles is None else handles
    kept, skipped = [], []
    for h in handles:
        # since transformers 5.25 LongCat's block maps zero-expert picks to weight-0 routed ids: offloaded, each
        # would read a real expert for nothing, so such blocks stay resident as before
        reason = h.family.offload_unsupported or (ZERO_EXPERTS_RESIDENT if h.info.zero_experts else None)
        if reason is None:
            kept.append(h)
        else:
            skipped.append(f"{h.info.experts_path} ({type(h.experts).__name__}: {reason})")
    if not kept:
        raise NoMoEFoundError(
            f"{type(model).__name__}: found no Mixture-of-Experts block whose experts moe-patch can offload "
            "(transformers-5 experts with the experts decorator, Llama 4, DBRX, or a ModuleList of expert MLPs)"
            + (f"; not offloadable: {', '.join(skipped[:3])}" if skipped else "")
            + "."
        )
    if skipped:
        logger.warning("offload: %d MoE blocks stay resident: %s", len(skipped), ", ".join(skipped[:3]))
    return [OffloadLayer(index=i, handle=h, tensors=h.family.expert_tensors(h.experts)) for i, h in enumerate(kept)]
