"""ViTPose+: one linear expert per dataset, chosen per *image* by ``dataset_index``. transformers runs
every expert on every token and masks; we run each image through its own expert only."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..errors import RoutingError
from ..validation import NAME_ATTR
from .base import PatchOptions
from .module_list import ExpertListOffload
from .records import bind_forward, set_attrs

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle


def _per_image_experts_forward(self, hidden_state: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    idx = indices.reshape(-1)
    out = hidden_state.new_zeros(*hidden_state.shape[:-1], self.part_features)
    for e in torch.unique(idx).tolist():
        if not 0 <= e < len(self):
            raise RoutingError(f"{getattr(self, NAME_ATTR, 'experts')}: dataset_index {e} outside [0, {len(self)})")
        rows = (idx == e).nonzero().squeeze(-1)
        out[rows] = self[e](hidden_state[rows])
    return out


class PerImageExpertsFamily(ExpertListOffload):
    name = "per_image"
    fixed_top_k = 1
    routing_kind = "per_input"  # the caller's dataset_index picks the expert of each image

    def match(self, block, name, experts) -> bool:
        if not isinstance(experts, torch.nn.ModuleList) or len(experts) < 2:
            return False
        if not all(type(m) is torch.nn.Linear for m in experts) or not hasattr(experts, "part_features"):
            return False
        return list(inspect.signature(type(experts).forward).parameters)[1:] == ["hidden_state", "indices"]

    def num_experts(self, experts) -> int:
        return len(experts)

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts[0].in_features), int(experts[0].out_features)

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(
            storage="module_list", gated=False, bias=experts[0].bias is not None, param_names=("weight", "bias")
        )

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        set_attrs(handle.experts, **{NAME_ATTR: handle.info.experts_path})
        bind_forward(handle.experts, _per_image_experts_forward)
