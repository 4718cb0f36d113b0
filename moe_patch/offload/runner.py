"""The offload engine as a family sees it: the runner of one layer (:class:`moe_patch.families.base.OffloadRunner`).

A family's forward computes its routed experts with :func:`moe_patch.families.run_experts`, which calls the
runner kept on the experts module; resident, that runner dispatches over the module's own weights, offloaded
it is this one. Blocks that call their expert modules one by one use the per-expert calls instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .engine import OffloadEngine


@dataclass(frozen=True)
class LayerRunner:
    engine: OffloadEngine
    layer: int

    def __call__(
        self,
        experts: torch.nn.Module,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        *,
        weight_inputs: bool = False,
    ) -> torch.Tensor:
        # the routing check of ``experts`` rides on the layer's one host transfer
        return self.engine.dispatch(
            self.layer, x, top_k_index, top_k_weights, weight_inputs=weight_inputs, checked_by=experts
        )

    def begin_layer(self, hidden: torch.Tensor) -> None:
        self.engine.begin_layer(self.layer, hidden)

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.engine.run_expert(self.layer, expert, x)

    def end_layer(self) -> None:
        self.engine.end_layer(self.layer)

    def __deepcopy__(self, memo):  # a copy of an offloaded model shares its engine (threads, caches)
        return self
