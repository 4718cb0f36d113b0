"""Llama 4: transformers computes every expert for every token (dense bmm over all E experts) with the routing
score applied to the expert *input*. Resident or offloaded, moe-patch computes only the routed top-k,
input-scaled, plus the shared expert."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.experts import ExpertBank
from .base import ExpertTensors, Family, KernelMaths, PatchOptions, ResidentRunner, param_3d, run_experts
from .records import bind_forward

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle


def _bank(experts: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> ExpertBank:
    act = experts.act_fn
    w = weights if weights is not None else {"gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}

    def activate(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return up * act(gate)  # the same product order as transformers, for bitwise-equal rows

    return ExpertBank(up=w["gate_up_proj"], down=w["down_proj"], activate=activate, transposed=True)


def _llama4_block_forward(self, hidden_states: torch.Tensor):
    """The MoE block: the routed top-k only, each expert's input scaled by its routing score
    (``routed_in * score``), plus the shared expert; returns ``(out, router_logits)`` as stock."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)  # called as a module: output recorders still see it
    top_k_index = torch.topk(router_logits, self.router.top_k, dim=1)[1]
    top_k_weights = router_scores.gather(1, top_k_index)
    routed = run_experts(self.experts, x, top_k_index, top_k_weights, weight_inputs=True)
    out = self.shared_expert(x)
    out.add_(routed)
    return out, router_logits


class Llama4Family(Family):
    """3-D transposed experts called as ``experts(routed_in)`` on every token of every expert."""

    name = "llama4_dense"
    routing_reader = "dense_scores"
    offload_unsupported = None

    def match(self, block, name, experts) -> bool:
        gu, down = param_3d(experts, "gate_up_proj"), param_3d(experts, "down_proj")
        router = getattr(block, "router", None)
        return (
            gu is not None
            and down is not None
            and not hasattr(experts, "has_gate")
            and gu.shape[1] == down.shape[2]
            and gu.shape[2] == 2 * down.shape[1]
            and router is not None
            and hasattr(router, "top_k")
            and hasattr(block, "shared_expert")
        )

    def num_experts(self, experts) -> int:
        return int(experts.gate_up_proj.shape[0])

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts.down_proj.shape[2]), int(experts.down_proj.shape[1])

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(storage="dense_bmm", gated=True, transposed=True, param_names=("gate_up_proj", "down_proj"))

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        self.install_resident(handle, options, ResidentRunner(_bank, self.num_experts(handle.experts)))

    def bind_routed(self, handle: BlockHandle) -> None:
        bind_forward(handle.block, _llama4_block_forward)

    def expert_tensors(self, experts) -> ExpertTensors:
        names = ("gate_up_proj", "down_proj")
        return ExpertTensors(
            names,
            {n: tuple(getattr(experts, n).shape[1:]) for n in names},
            experts.down_proj.dtype,
            self.num_experts(experts),
        )

    def slot_bank(self, experts, weights) -> ExpertBank:
        return _bank(experts, weights)

    def kernel_maths(self, experts) -> KernelMaths | None:
        """silu(gate) * up over [gate; up] halves, held ``[in, out]`` (its bf16 checkpoints store them so: the
        kernels refuse those bytes and torch computes them; the routing weight scales the input)."""
        from .kernel import activation_name

        if activation_name(experts.act_fn) != "silu":
            return None
        return KernelMaths("gate_up_proj", "down_proj", transposed=True)
