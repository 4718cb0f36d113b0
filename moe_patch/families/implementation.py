"""The ``moe_patch`` experts implementation: what transformers runs for decorated experts on a patched model.

Registered in transformers' experts registry (:func:`.fused.register_experts_implementation`). It checks the
routing, then runs whichever path is measured fastest on this machine for this many rows per expert: the CPU
kernel (:mod:`.kernel`), transformers' grouped GEMMs, moe-patch's fp32 upcast or loop (:mod:`..dispatch.experts`).
It lives with the families, above the dispatch maths, because the kernel path asks the family what its experts
compute.
"""

from __future__ import annotations

import torch

from .. import validation
from ..dispatch import experts as dispatch  # looked up at call time, so tests can watch which path runs
from .kernel import module_kernel


def _kernel_wins(weight: torch.Tensor, x: torch.Tensor, rows_per_expert: float) -> bool:
    """On a CPU, outside autograd and compilation, whether the CPU expert kernel (:mod:`moe_patch.kernels`)
    beats transformers' grouped_mm at this many rows per expert (measured on the running machine)."""
    if (
        x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return False
    from .kernel import kernel_wins  # looked up at call time: tests pin the measured answer

    return kernel_wins(weight.dtype, rows_per_expert)


def moe_patch_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``moe_patch`` experts implementation, registered in transformers' experts registry.

    Never slower than stock: it checks the routing, then runs the implementation the model had before
    patching (transformers' grouped GEMMs by default), except where moe-patch is measured faster on this
    machine (half-precision experts with enough rows each, on a CPU where fp32 beats its half-precision
    GEMM) or where transformers' kernel cannot take the weights (odd widths, float64: ours loops).
    On CUDA and while compiling, transformers' grouped path is its sync-free one.
    """
    from transformers.integrations.moe import grouped_mm_experts_forward

    validation.check_routing(self, top_k_index, top_k_weights)  # skipped while compiling
    if dispatch.use_transformers_grouped(hidden_states) and dispatch._module_kernel_accepts(self):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    # rows per active expert without a host sync: at most min(E, T * k) experts are active
    slots = top_k_index.numel()
    up = getattr(self, dispatch.up_weight_name(self))
    rows = slots / max(1, min(up.shape[0], slots))
    if _kernel_wins(up, hidden_states, rows):
        kernel = module_kernel(self)
        if kernel is not None:
            return kernel.forward(
                hidden_states.contiguous(), top_k_index.to(torch.int64).contiguous(), top_k_weights.contiguous()
            )
    if dispatch.upcast_wins(up, hidden_states, rows):
        return dispatch.bank_dispatch(dispatch.fused_bank(self), hidden_states, top_k_index, top_k_weights)
    stock = dispatch.stock_experts_forward(self)
    if stock is not grouped_mm_experts_forward or dispatch._module_kernel_accepts(self):
        return stock(self, hidden_states, top_k_index, top_k_weights)
    return dispatch.bank_dispatch(dispatch.fused_bank(self), hidden_states, top_k_index, top_k_weights)
