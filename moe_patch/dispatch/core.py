"""Token dispatch maths: pure functions, tensors in and tensors out.

Vocabulary (MegaBlocks / ScatterMoE style):
- T tokens, each routed to k experts: ``top_k_index`` and ``top_k_weights`` are ``[T, k]``.
- A *slot* is one (token, k) pair, S = T * k slots, flattened row-major.
- A :class:`DispatchPlan` sorts slots by expert so each expert sees one contiguous block of rows.

An *expert function* computes one expert on its rows; the dispatchers below only decide which rows
go where and how results are combined. The experts' own maths (gate, activation, bias, norm) lives in
:mod:`moe_patch.dispatch.experts`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]
"""``fn(expert_id, rows[n, H]) -> out[n, H_out]``: one expert applied to the rows routed to it."""


@dataclass(frozen=True)
class DispatchPlan:
    """Slots sorted by expert.

    Attributes:
        order: ``[S]`` slot ids sorted by expert (stable, so token order is kept inside an expert).
        token_ids: ``[S]`` token id of each sorted slot (``order // k``).
        counts: ``[E]`` number of slots per expert (int64, on the routing device).
        offsets: python list of ``E + 1`` row offsets into the sorted slots.
        active: python list of expert ids that received at least one slot, ascending.
    """

    order: torch.Tensor
    token_ids: torch.Tensor
    counts: torch.Tensor
    offsets: list[int]
    active: list[int]

    def rows(self, expert: int) -> slice:
        return slice(self.offsets[expert], self.offsets[expert + 1])


def plan_dispatch(top_k_index: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the ``[T, k]`` routing table by expert.

    Indices equal to ``num_experts`` or above are sentinels (dropped slots, as expert parallelism and
    capacity-limited routers produce) and are sorted to the tail, outside every expert's rows.
    """
    k = top_k_index.shape[-1] if top_k_index.dim() > 1 else 1
    flat = top_k_index.reshape(-1)
    _, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat.clamp(max=num_experts), minlength=num_experts + 1)[:num_experts]
    # One host sync for the whole block, as transformers' own grouped path does.
    offsets = [0] + torch.cumsum(counts, 0).tolist()
    active = [e for e in range(num_experts) if offsets[e + 1] > offsets[e]]
    return DispatchPlan(order=order, token_ids=order // k, counts=counts, offsets=offsets, active=active)


def dispatch_combine(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_fn: ExpertFn,
    *,
    plan: DispatchPlan | None = None,
    weight_inputs: bool = False,
    out_dim: int | None = None,
    order: list[int] | None = None,
) -> torch.Tensor:
    """Run each active expert once on its rows and combine the weighted results per token.

    Args:
        hidden_states: ``[T, H]``.
        top_k_index / top_k_weights: ``[T, k]``.
        expert_fn: computes one expert on a block of rows.
        weight_inputs: scale each row by its routing weight *before* the expert instead of after
            (Llama 4 does this; it is not the same function when the expert is non-linear).
        out_dim: width of the expert output (defaults to ``H``).
        order: the active experts in the order to compute them (the offload engine puts cached ones
            first, so reads of the others overlap their compute). Results are still summed in expert
            order, so the output is bitwise the same for any order.

    Returns ``[T, out_dim]`` in ``hidden_states.dtype``. Autograd flows to the inputs, the weights and
    every parameter ``expert_fn`` uses.
    """
    T = hidden_states.shape[0]
    plan = plan if plan is not None else plan_dispatch(top_k_index, num_experts)
    flat_w = top_k_weights.reshape(-1)
    out = hidden_states.new_zeros(T, out_dim or hidden_states.shape[-1])
    done: dict[int, torch.Tensor] = {}  # computed ahead of their turn in the sum
    turn = 0
    for e in order if order is not None else plan.active:
        sl = plan.rows(e)
        tok = plan.token_ids[sl]
        w = flat_w[plan.order[sl]].unsqueeze(-1)
        x = hidden_states[tok]
        if weight_inputs:
            done[e] = expert_fn(e, (x * w).to(x.dtype))
        else:
            done[e] = expert_fn(e, x) * w
        while turn < len(plan.active) and plan.active[turn] in done:
            first = plan.active[turn]
            out.index_add_(0, plan.token_ids[plan.rows(first)], done.pop(first).to(out.dtype))
            turn += 1
    return out


#: torch's grouped GEMM kernel needs every stride of both operands, and their base pointers, to be
#: multiples of this many bytes ("strides should be multiple of 16 bytes" otherwise, e.g. for an
#: fp32 expert of width 37).
GROUPED_MM_ALIGNMENT = 16
#: The weight dtypes the kernel takes (float64 raises).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_operand(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The ``[E, in, out]`` right operand the grouped GEMM multiplies by, for an expert weight stored
    ``[E, out, in]`` (``transposed=False``, nn.Linear layout) or ``[E, in, out]``. A view, never a copy."""
    return weight if transposed else weight.transpose(-2, -1)


def grouped_linear(
    rows: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    *,
    transposed: bool,
    bias_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rows[S, in]`` (sorted by expert) times each expert's weight, in one grouped GEMM.

    ``weight`` is ``[E, out, in]`` (``transposed=False``, nn.Linear layout) or ``[E, in, out]``.
    ``offsets`` is the int32 cumulative row count per expert, as ``torch.nn.functional.grouped_mm`` takes it.
    The caller checks :func:`grouped_mm_supported` first.
    """
    w = kernel_operand(weight, transposed)
    out = _grouped_mm(rows.to(w.dtype), w, offsets)
    if bias_rows is not None:
        out = out + bias_rows
    return out


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def grouped_mm_accepts(operands: list[torch.Tensor]) -> bool:
    """Whether the kernel takes these right operands (:func:`kernel_operand` views) and the contiguous
    ``[S, in]`` rows they multiply: fp32 / bf16 / fp16, 16-byte aligned base pointers and strides."""

    def aligned(nbytes: int) -> bool:
        return nbytes % GROUPED_MM_ALIGNMENT == 0

    for w in operands:
        if w.dtype not in GROUPED_MM_DTYPES:
            return False
        size = w.element_size()
        if not aligned(w.shape[-2] * size):  # the rows [S, in] it multiplies have stride `in`
            return False
        # (a graph being compiled has no data pointers; strides are known there)
        if not torch.compiler.is_compiling() and not aligned(w.data_ptr()):
            return False
        if not all(aligned(stride * size) for stride in w.stride() if stride != 1):
            return False
    return True


def grouped_mm_supported(hidden_states: torch.Tensor, operands: list[torch.Tensor]) -> bool:
    """Whether the grouped GEMM kernel can run on these operands (:func:`kernel_operand` views of each
    expert weight it would multiply by): inference only (its CPU backward is not usable), not under
    compilation unless bf16 (inductor lowers it only for bf16), SM80+ on CUDA, and operands it takes
    (:func:`grouped_mm_accepts`). Every caller of the kernel asks this first."""
    if not operands:
        return False
    weight = operands[0]
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(w.requires_grad for w in operands)):
        return False
    if not (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")):
        return False
    if torch.compiler.is_compiling() and weight.dtype != torch.bfloat16:
        return False
    if weight.device.type == "cuda":
        capability = torch.cuda.get_device_capability(weight.device)
        if capability < (8, 0):
            _say_no_grouped_kernel(weight.device, capability)
            return False
    elif weight.device.type != "cpu":
        return False
    return grouped_mm_accepts(operands)


@functools.cache  # once per device and process: the dispatch asks on every call
def _say_no_grouped_kernel(device: torch.device, capability: tuple[int, int]) -> None:
    logger.warning(
        "%s (compute capability %d.%d) has no grouped GEMM kernel (torch's needs SM80+, Ampere or newer): "
        "experts run in a loop, one GEMM per active expert",
        device,
        *capability,
    )


def combine_sorted(
    sorted_out: torch.Tensor, plan: DispatchPlan, top_k_weights: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """Weight the expert-sorted outputs ``[n, H]`` by their routing weights and sum them per token.

    Without dropped slots this un-sorts and sums over k (deterministic, the order transformers uses);
    with dropped slots (sentinels past the last expert) it scatter-adds the kept rows.
    """
    n, width = sorted_out.shape
    flat_w = top_k_weights.reshape(-1)
    if n == flat_w.numel():
        weighted = sorted_out * flat_w[plan.order].unsqueeze(-1).to(sorted_out.dtype)
        unsorted = torch.empty_like(weighted)
        unsorted[plan.order] = weighted
        return unsorted.view(num_tokens, top_k_weights.shape[-1], width).sum(dim=1)
    weighted = sorted_out * flat_w[plan.order[:n]].unsqueeze(-1).to(sorted_out.dtype)
    return sorted_out.new_zeros(num_tokens, width).index_add_(0, plan.token_ids[:n], weighted)
