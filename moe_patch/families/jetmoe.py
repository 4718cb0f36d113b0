"""JetMoE: ``input_linear``/``output_linear`` hold ``[E, out, in]`` weights; the router returns its
own expert-sorted plan (sorted slot ids, token ids, gates, expert sizes, logits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.experts import ExpertBank, bank_dispatch, glu
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .base import Family, PatchOptions
from .records import bind_forward, set_attrs

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle


def _jetmoe_forward(self, layer_input: torch.Tensor) -> torch.Tensor:
    bsz, length, emb = layer_input.size()
    x = layer_input.reshape(-1, emb)
    order, _, gates, expert_size, _ = self.router(x)  # called as a module: output recorders still see it
    k = self.router.top_k
    # Back from the router's sorted plan to the [T, k] routing table.
    experts_sorted = torch.repeat_interleave(
        torch.arange(len(expert_size), device=x.device), torch.as_tensor(expert_size, device=x.device)
    )
    top_k_index = torch.empty_like(order).scatter_(0, order, experts_sorted).view(-1, k)
    top_k_weights = torch.empty_like(gates).scatter_(0, order, gates).view(-1, k)
    check_routing(self, top_k_index, top_k_weights, len(expert_size))
    bank = ExpertBank(up=self.input_linear.weight, down=self.output_linear.weight, activate=glu(self.activation))
    out = bank_dispatch(bank, x, top_k_index, top_k_weights)
    return out.view(bsz, length, self.input_size) + self.bias


class JetMoeFamily(Family):
    """The block owns the parallel-experts pair; `input_linear` stands for the experts."""

    name = "parallel_experts"
    routing_reader = "sorted_plan"
    offload_unsupported = (
        "JetMoE's experts are a pair of block-level parallel linears whose router returns its own "
        "sorted plan; they stay resident"
    )

    def match(self, block, name, experts) -> bool:
        out = getattr(block, "output_linear", None)
        w = getattr(experts, "weight", None)
        wo = getattr(out, "weight", None)
        # [E, 2I, H] in, [E, H, I] out: a GLU expert bank (JetMoE's attention experts, MoA, are not).
        return (
            name == "input_linear"
            and isinstance(w, torch.Tensor)
            and w.dim() == 3
            and isinstance(wo, torch.Tensor)
            and wo.dim() == 3
            and w.shape[1] == 2 * wo.shape[2]
            and hasattr(block, "router")
            and hasattr(block.router, "top_k")
            and hasattr(block, "bias")
        )

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts.weight.shape[2]), int(experts.weight.shape[1] // 2)

    def params_per_expert(self, experts) -> int:
        return 3 * int(experts.weight.shape[1] // 2) * int(experts.weight.shape[2])

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(storage="fused", gated=True, param_names=("input_linear.weight", "output_linear.weight"))

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        set_attrs(handle.block, **{NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate})
        bind_forward(handle.block, _jetmoe_forward)
