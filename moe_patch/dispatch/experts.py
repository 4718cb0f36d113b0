"""Expert maths over a bank of stacked expert weights, and the moe-patch experts forward.

transformers 5 stores the experts of a block as 3-D parameters on one module decorated with
``@use_experts_implementation``: ``gate_up_proj [E, 2I, H]`` ([gate; up] rows, or interleaved, or
``[E, H, 2I]`` when ``is_transposed``), ``down_proj [E, H, I]``, optional ``*_bias``, or ``up_proj``
alone when ``has_gate`` is False. The module's own ``_apply_gate`` does the gating (clamped or
soft-capped SwiGLU in some families, interleaved split in gpt_oss), so it is always called here.

Other layouts (DBRX's 2-D stacks, JetMoE, Llama 4, repacked ModuleLists) are described by the same
:class:`ExpertBank`, built by their families from views of the model's own parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core import (
    DispatchPlan,
    combine_sorted,
    dispatch_combine,
    grouped_linear,
    grouped_mm_accepts,
    grouped_mm_supported,
    kernel_operand,
    plan_dispatch,
)


def _loop_wins(weight: torch.Tensor, x: torch.Tensor, rows_per_expert: float) -> bool:
    """On a CPU, whether a loop over the active experts beats one grouped GEMM at this many rows each
    (measured on the running machine: on one 2-core AVX2 VM grouped_mm streamed a decode expert 3x faster
    than F.linear's GEMV, on others the loop wins at one row)."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    from .calibration import loop_wins

    return loop_wins(weight.dtype, rows_per_expert)


#: The name moe-patch registers in transformers' experts registry.
IMPLEMENTATION_NAME = "moe_patch"


def upcast_wins(weight: torch.Tensor, x: torch.Tensor, rows_per_expert: float) -> bool:
    """Whether half-precision experts with this many rows each compute faster in fp32 (their weights cast
    on the fly) on this CPU: half-precision GEMMs run several times slower than fp32 on CPUs without
    native bf16/fp16 arithmetic. The crossover is measured on the running machine
    (:func:`~moe_patch.dispatch.calibration.upcast_min_rows`), never assumed."""
    if x.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return False
    from .calibration import upcast_min_rows

    return rows_per_expert >= upcast_min_rows(weight.dtype)


@dataclass(frozen=True)
class ExpertBank:
    """E experts' weights as stacked tensors (views of the model's parameters, never copies).

    Attributes:
        up: first projection ``[E, out, in]`` (``[E, in, out]`` when ``transposed``); for gated experts
            either [gate; up] rows fused (``gate`` is None) or the up rows alone.
        down: second projection ``[E, H, I]`` (``[E, I, H]`` when ``down_transposed``).
        activate: maps the first projection's output to the down projection's input (the module's
            ``_apply_gate`` for fused gates, ``act`` for plain MLPs, ``act(g) * u`` for split gates).
        gate: separate gate projection (DBRX ``w1``) in ``up``'s layout, or None.
        up_bias / down_bias: ``[E, out]`` biases or None.
        post: applied to each expert output (post-expert norm) or None.
    """

    up: torch.Tensor
    down: torch.Tensor
    activate: Callable[..., torch.Tensor]
    transposed: bool = False
    down_transposed: bool | None = None
    gate: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    post: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @property
    def _down_t(self) -> bool:
        return self.transposed if self.down_transposed is None else self.down_transposed

    def kernel_operands(self) -> list[torch.Tensor]:
        """The right operands a grouped GEMM over this bank multiplies by (views), for
        :func:`~moe_patch.dispatch.core.grouped_mm_supported`."""
        ops = [kernel_operand(self.up, self.transposed), kernel_operand(self.down, self._down_t)]
        return ops + ([kernel_operand(self.gate, self.transposed)] if self.gate is not None else [])


def glu(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated activation ``act(gate) * up`` over fused ``[gate; up]`` halves of the last dimension."""

    def activate(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act(gate) * up

    return activate


def expert_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """``x @ W`` for one expert's weight in nn.Linear layout ``[out, in]`` or transposed ``[in, out]``."""
    if transposed:
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def bank_expert(bank: ExpertBank, e: int, x: torch.Tensor, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Expert ``e`` of the bank on rows ``x``, in the weights' dtype or in ``compute_dtype`` (weights of
    this one expert are cast on the fly; the model's parameters are untouched)."""
    dt = compute_dtype or bank.down.dtype

    def w(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[e].to(dt)

    x = x.to(dt)
    h = expert_linear(x, w(bank.up), w(bank.up_bias), bank.transposed)
    if bank.gate is not None:
        h = bank.activate(expert_linear(x, w(bank.gate), None, bank.transposed), h)
    else:
        h = bank.activate(h)
    y = expert_linear(h, w(bank.down), w(bank.down_bias), bank._down_t)
    return bank.post(y) if bank.post is not None else y


def grouped_mlp(bank: ExpertBank, rows: torch.Tensor, offs: torch.Tensor, eid: torch.Tensor | None) -> torch.Tensor:
    """The experts' MLP over expert-sorted ``rows`` in grouped GEMMs (``offs``: cumulative rows per expert,
    ``eid``: each row's expert, for the biases)."""
    h = grouped_linear(
        rows,
        bank.up,
        offs,
        transposed=bank.transposed,
        bias_rows=bank.up_bias[eid] if bank.up_bias is not None else None,
    )
    if bank.gate is not None:
        h = bank.activate(grouped_linear(rows, bank.gate, offs, transposed=bank.transposed), h)
    else:
        h = bank.activate(h)
    y = grouped_linear(
        h,
        bank.down,
        offs,
        transposed=bank._down_t,
        bias_rows=bank.down_bias[eid] if bank.down_bias is not None else None,
    )
    return bank.post(y) if bank.post is not None else y


def bank_grouped(
    bank: ExpertBank, x: torch.Tensor, plan: DispatchPlan, top_k_weights: torch.Tensor, *, weight_inputs: bool = False
) -> torch.Tensor:
    """All experts of the bank in grouped GEMMs over expert-sorted rows; returns ``[T, H]``."""
    n = plan.offsets[-1]  # sentinel slots (dropped tokens) sort past the last expert
    offs = torch.cumsum(plan.counts, 0).to(torch.int32)
    eid = None
    if bank.up_bias is not None or bank.down_bias is not None:
        eid = torch.repeat_interleave(torch.arange(bank.num_experts, device=plan.counts.device), plan.counts)
    rows = x[plan.token_ids[:n]]
    if weight_inputs:
        rows = (rows * top_k_weights.reshape(-1)[plan.order[:n]].unsqueeze(-1)).to(rows.dtype)
    y = grouped_mlp(bank, rows, offs, eid)
    weights = torch.ones_like(top_k_weights) if weight_inputs else top_k_weights
    return combine_sorted(y, plan, weights, x.shape[0]).to(x.dtype)


def bank_dispatch(
    bank: ExpertBank,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    weight_inputs: bool = False,
    plan: DispatchPlan | None = None,
) -> torch.Tensor:
    """Route ``x [T, H]`` through the bank: grouped GEMMs when experts get many rows (prefill, inference),
    a loop over the active experts on weight views otherwise (decode, training: autograd-safe)."""
    plan = plan if plan is not None else plan_dispatch(top_k_index, bank.num_experts)
    rows_per_expert = plan.offsets[-1] / max(len(plan.active), 1)
    if upcast_wins(bank.up, x, rows_per_expert):
        return dispatch_combine(
            x,
            top_k_index,
            top_k_weights,
            bank.num_experts,
            lambda e, rows: bank_expert(bank, e, rows, torch.float32),
            plan=plan,
            weight_inputs=weight_inputs,
        )
    if grouped_mm_supported(x, bank.kernel_operands()) and not _loop_wins(bank.up, x, rows_per_expert):
        return bank_grouped(bank, x, plan, top_k_weights, weight_inputs=weight_inputs)
    return dispatch_combine(
        x,
        top_k_index,
        top_k_weights,
        bank.num_experts,
        lambda e, rows: bank_expert(bank, e, rows),
        plan=plan,
        weight_inputs=weight_inputs,
    )


# --------------------------------------------------------------------------- transformers 5 fused modules


def fused_bank(module: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> ExpertBank:
    """The bank of a transformers-5 fused experts module (flags from its decorator), over its own
    parameters or over ``weights`` stacked like them (``[N, ...]``, e.g. the offload engine's slots)."""
    first = up_weight_name(module)

    def get(name: str) -> torch.Tensor | None:
        return weights.get(name) if weights is not None else getattr(module, name, None)

    return ExpertBank(
        up=get(first),
        down=get("down_proj"),
        activate=module._apply_gate if module.has_gate else module.act_fn,
        transposed=bool(module.is_transposed),
        up_bias=get(first + "_bias") if module.has_bias else None,
        down_bias=get("down_proj_bias") if module.has_bias else None,
        post=module.post_expert_norm if module.has_post_expert_norm else None,
    )


def up_weight_name(module: torch.nn.Module) -> str:
    """The first weight a fused-experts module multiplies by: ``gate_up_proj`` (gated) or ``up_proj``."""
    return "gate_up_proj" if module.has_gate else "up_proj"


def expert_weight_names(module: torch.nn.Module) -> tuple[str, ...]:
    """Names of the per-expert parameters of a fused-experts module, in compute order."""
    names = [up_weight_name(module)]
    if module.has_bias:
        names.append(names[0] + "_bias")
    names += ["down_proj"] + (["down_proj_bias"] if module.has_bias else [])
    return tuple(names)


def resident_expert_weights(module: torch.nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """Views (no copy) of one expert's slices of the module's own parameters."""
    return {name: getattr(module, name)[expert] for name in expert_weight_names(module)}


def fused_expert_forward(module: torch.nn.Module, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert of a fused-experts module on rows ``x``, from that expert's weight slices keyed like
    the module's parameters (the offload engine passes weights fetched from its caches)."""
    return bank_expert(fused_bank(module, {n: t.unsqueeze(0) for n, t in weights.items()}), 0, x)


def grouped_dispatch_on_device(
    bank: ExpertBank,
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    weight_inputs: bool = False,
) -> torch.Tensor:
    """:func:`bank_grouped` without a host sync (offsets stay on the device; ``histc`` instead of
    ``bincount``), for a GPU whose CPU should keep queueing kernels. Ids ``>= bank.num_experts`` are
    dropped slots: their rows run through no group and are masked out of the combine."""
    n = bank.num_experts
    k = top_k_index.shape[-1] if top_k_index.dim() > 1 else 1
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.to(torch.float32), bins=n, min=-0.5, max=n - 0.5).to(torch.int32)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    sorted_ids = flat[order]
    valid = sorted_ids < n
    tokens = order // k
    rows = x[tokens]
    w = top_k_weights.reshape(-1)[order].unsqueeze(-1)
    if weight_inputs:
        rows = (rows * w).to(rows.dtype)
    eid = sorted_ids.clamp(max=n - 1)
    y = grouped_mlp(bank, rows, offs, eid)
    if not weight_inputs:
        y = y * w.to(y.dtype)
    y = torch.where(valid.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device))  # rows past the groups
    out = torch.zeros(x.shape[0], y.shape[-1], dtype=y.dtype, device=x.device)
    return out.index_add_(0, tokens, y).to(x.dtype)


def use_transformers_grouped(hidden_states: torch.Tensor) -> bool:
    """Whether to run transformers' own grouped kernels instead of our plan.

    Their grouped path has no host sync (histc, tensor offsets): under graph capture ``fullgraph=True``
    works, and on a GPU the CPU keeps queueing kernels ahead. Our plan reads its offsets back once per
    block, which made it 0.67x of theirs on an H100 (bench/dispatch.py --device cuda, Mixtral bf16).
    """
    return torch.compiler.is_compiling() or hidden_states.device.type == "cuda"


def _transformers_kernel_accepts(bank: ExpertBank) -> bool:
    """transformers' grouped path hands its operands to torch's kernel unchecked (odd expert widths or
    float64 crash it), except while compiling weights other than bf16, where it runs its own loop operator."""
    if torch.compiler.is_compiling() and bank.up.dtype != torch.bfloat16:
        return True
    return grouped_mm_accepts(bank.kernel_operands())


_ACCEPTS_ATTR = "_moe_patch_cache_kernel_accepts"  # families.records.CACHE_PREFIX: unpatch drops it


def _module_kernel_accepts(module: torch.nn.Module) -> bool:
    """:func:`_transformers_kernel_accepts` for a fused-experts module, kept on the module for as long as its
    weights are the same tensors in the same place (a decode step asks once per layer; the answer only
    changes when the weights are moved, replaced or re-typed)."""
    if torch.compiler.is_compiling():  # a graph has no data pointers to key on
        return _transformers_kernel_accepts(fused_bank(module))
    weights = tuple(getattr(module, n) for n in expert_weight_names(module))
    key = tuple((w.data_ptr(), w.dtype, w.stride()) for w in weights)
    cached = module.__dict__.get(_ACCEPTS_ATTR)
    if cached is None or cached[0] != key:
        cached = module.__dict__[_ACCEPTS_ATTR] = (key, _transformers_kernel_accepts(fused_bank(module)))
    return cached[1]


def stock_experts_forward(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The experts implementation ``module`` ran before moe-patch (what stock transformers runs for it):
    the one its config selected at patch time, ``grouped_mm`` (transformers' default) if none."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    replaced = getattr(module.config, "_moe_patch_replaces", None)
    if not isinstance(replaced, str) or replaced == IMPLEMENTATION_NAME:  # none, or a config that named us
        replaced = "grouped_mm"
    eager = getattr(type(module).forward, "__wrapped__", None)  # the class's own (undecorated) forward
    return ALL_EXPERTS_FUNCTIONS.get_interface(replaced, eager)
