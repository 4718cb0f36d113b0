"""Llama 4: transformers computes every expert for every token (dense bmm over all E experts) with
the routing score applied to the expert *input*. We dispatch only the top-k experts, input-scaled."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.experts import ExpertBank, bank_dispatch
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .base import Adapter, PatchOptions, bind_forward, param_3d, set_attrs

if TYPE_CHECKING:
    from ..detect.finder import BlockHandle


def _bank(experts: torch.nn.Module) -> ExpertBank:
    act = experts.act_fn

    def activate(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return up * act(gate)  # the same product order as transformers, for bitwise-equal rows

    return ExpertBank(up=experts.gate_up_proj, down=experts.down_proj, activate=activate, transposed=True)


def _llama4_moe_forward(self, hidden_states: torch.Tensor):
    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)  # called as a module: output recorders still see it
    top_k_index = torch.topk(router_logits, self.router.top_k, dim=1)[1]
    top_k_weights = router_scores.gather(1, top_k_index)
    check_routing(self.experts, top_k_index, top_k_weights, int(self.experts.gate_up_proj.shape[0]))
    routed = bank_dispatch(_bank(self.experts), x, top_k_index, top_k_weights, weight_inputs=True)
    out = self.shared_expert(x)
    out.add_(routed)
    return out, router_logits


class Llama4Adapter(Adapter):
    """3-D transposed experts called as ``experts(routed_in)`` on every token of every expert."""

    name = "llama4_dense"

    def match(self, block, name, experts) -> bool:
        gu, down = param_3d(experts, "gate_up_proj"), param_3d(experts, "down_proj")
        router = getattr(block, "router", None)
        return (gu is not None and down is not None and not hasattr(experts, "has_gate")
                and gu.shape[1] == down.shape[2] and gu.shape[2] == 2 * down.shape[1]
                and router is not None and hasattr(router, "top_k") and hasattr(block, "shared_expert"))

    def num_experts(self, experts) -> int:
        return int(experts.gate_up_proj.shape[0])

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts.down_proj.shape[2]), int(experts.down_proj.shape[1])

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(storage="dense_bmm", gated=True, transposed=True,
                            param_names=("gate_up_proj", "down_proj"))

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        set_attrs(handle.experts, **{NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate})
        bind_forward(handle.block, _llama4_moe_forward)
