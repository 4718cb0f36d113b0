"""The forwards an offloaded model runs, and the maths of one expert from fetched weights.

:func:`attach_offload` binds these to the user's modules (instance attributes only): each one checks the
routing and hands the layer to :meth:`OffloadEngine.dispatch` (one grouped GEMM over the cached
experts' slots, then the misses).

- fused transformers-5 experts (``experts(hidden, top_k_index, top_k_weights)``): :func:`fused_forward`;
- DBRX's 2-D stacked experts (same signature, 3-D input): :func:`flat_2d_forward`;
- Llama 4, whose stock forward runs every expert for every token: :func:`llama4_block_forward` replaces
  the MoE block's forward and computes only the routed top-k, input-scaled as transformers does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dispatch.experts import ExpertBank, bank_expert, fused_bank, fused_expert_forward
from .layers import OffloadLayer

#: instance attribute of offloaded experts modules: ``(engine, layer index)``
ENGINE_ATTR = "_moe_offload"


def slab_bank(layer: OffloadLayer, weights: dict[str, torch.Tensor]) -> ExpertBank:
    """The bank of ``layer``'s experts over ``weights`` stacked ``[N, ...]`` per parameter (the engine's slots)."""
    if layer.storage == "fused":
        return fused_bank(layer.experts, weights)
    if layer.storage == "dense_bmm":
        act = layer.experts.act_fn

        def activate(h: torch.Tensor) -> torch.Tensor:
            gate, up = h.chunk(2, dim=-1)
            return up * act(gate)  # transformers' product order, for bitwise-equal rows

        return ExpertBank(up=weights["gate_up_proj"], down=weights["down_proj"], activate=activate, transposed=True)
    act = layer.experts.mlp.activation_fn
    return ExpertBank(up=weights["mlp.v1"], gate=weights["mlp.w1"], down=weights["mlp.w2"],
                      activate=lambda g, u: act(g) * u, transposed=False, down_transposed=True)


def compute_expert(layer: OffloadLayer, expert: int, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Expert ``expert`` of ``layer`` on rows ``x`` from its fetched ``weights`` (decoded, on x's device)."""
    if layer.storage == "fused":
        return fused_expert_forward(layer.experts, x, weights)
    if layer.storage in ("dense_bmm", "flat_2d"):
        return bank_expert(slab_bank(layer, {n: t.unsqueeze(0) for n, t in weights.items()}), 0, x)
    # module_list: run the expert module's own class forward with the fetched tensors swapped in for the
    # placeholders (its instance forward is the engine's hook, so functional_call would recurse)
    module = layer.experts[expert]
    slots = []
    for name, value in weights.items():
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        slots.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = value
    try:
        return type(module).forward(module, x.to(next(iter(weights.values())).dtype))
    finally:
        for owner, leaf, old in slots:
            owner._parameters[leaf] = old


def _dispatch(experts: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
              num_experts: int, *, weight_inputs: bool = False) -> torch.Tensor:
    engine, layer = getattr(experts, ENGINE_ATTR)
    # the routing check rides on the layer's one host transfer
    return engine.dispatch(layer, x, top_k_index, top_k_weights, weight_inputs=weight_inputs, checked_by=experts)


def fused_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """Offloaded forward of a transformers-5 fused experts module."""
    return _dispatch(self, hidden_states, top_k_index, top_k_weights, self.num_experts)


def flat_2d_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """Offloaded forward of DBRX's experts (``[B, S, H]`` in, ``[B, S, H]`` out, as its own forward)."""
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.hidden_size)
    out = _dispatch(self, x, top_k_index, top_k_weights, self.num_experts)
    return out.view(batch, -1, self.hidden_size)


def llama4_block_forward(self: nn.Module, hidden_states: torch.Tensor):
    """Offloaded forward of a Llama 4 MoE block: the routed top-k only, each expert's input scaled by its
    routing score (``routed_in * score``), plus the shared expert; returns ``(out, router_logits)`` as stock."""
    x = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(x)  # called as a module: output recorders still see it
    top_k_index = torch.topk(router_logits, self.router.top_k, dim=1)[1]
    top_k_weights = router_scores.gather(1, top_k_index)
    routed = _dispatch(self.experts, x, top_k_index, top_k_weights, self.num_experts, weight_inputs=True)
    out = self.shared_expert(x)
    out.add_(routed)
    return out, router_logits
