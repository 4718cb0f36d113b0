"""One layer of experts computed by the CPU kernels (:mod:`moe_patch.kernels`), from what a caller holds.

Two answers meet here: the family's (:meth:`~.base.Family.kernel_maths`: which per-expert tensors are the
projections, the activation and the gate/up layout) and the format's (:meth:`StoredLayout.kernel_format
<moe_patch.formats.stored.StoredLayout.kernel_format>`: how a projection's stored bytes read; plain tensors read
as their dtype). :func:`layer_spec` turns them into the kernels' :class:`~moe_patch.kernels.MoELayerSpec`, or says
why not; :class:`ExpertKernel` holds the :class:`~moe_patch.kernels.MoEKernel` and attaches an expert from the
tensors a caller holds (the resident module's parameters, an engine slot, a cache entry in its stored bytes):
views, never copies. Whoever builds one keeps torch's path for anything it refuses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..dispatch.calibration import CALIBRATIONS, LOOP_BUCKETS
from ..errors import InvalidArgumentError
from ..formats import StoredTensor
from ..formats.cast import CastFormat
from ..kernels import ExpertFormat, ExpertWeights, KernelUnavailableError, MoEKernel, MoELayerSpec, available
from ..timing import best_seconds
from .base import KernelMaths
from .records import derived

#: an expert's tensors as a caller holds them: plain tensors, or stored bytes (quantized checkpoints)
Entry = Mapping[str, Any]


def activation_name(act: Any) -> str | None:
    """The kernels' name of a transformers activation module: ``silu``, ``gelu_tanh`` (the tanh approximation,
    however transformers computes it), or None for any other (erf gelu, relu...: torch computes those)."""
    from transformers import activations as A

    if type(act) in (torch.nn.SiLU, A.SiLUActivation):
        return "silu"
    if type(act) in (A.GELUTanh, A.NewGELUActivation, A.FastGELUActivation):
        return "gelu_tanh"
    return None


def projection_format(t: torch.Tensor | StoredTensor, transposed: bool) -> ExpertFormat | None:
    """How the kernels read one projection of an expert (``t``: real or meta tensors), None when they cannot."""
    if isinstance(t, StoredTensor):
        return t.layout.kernel_format(t.tensors, transposed)
    if t.dim() != 2:
        return None
    return ExpertFormat.dense(t.dtype, transposed=transposed)


def _vector(t: torch.Tensor | StoredTensor | None) -> torch.Tensor | None:
    """A bias as the kernels read it: a 1-D tensor, or the stored vector of a plain cast (bf16 on disk, fp32
    in the model: the kernels read the stored dtype), else None."""
    if isinstance(t, StoredTensor):
        if len(t.layout.pieces) != 1 or not isinstance(t.layout.pieces[0].format, CastFormat):
            return None
        t = t.layout.kernel_tensors(t.tensors)[0]
    return t if isinstance(t, torch.Tensor) and t.dim() == 1 else None


def layer_spec(maths: KernelMaths | None, num_experts: int, entry: Entry) -> MoELayerSpec | str:
    """The kernels' spec of a layer whose experts look like ``entry`` (one expert's tensors by name, real or
    meta), or why the kernels cannot compute it."""
    if maths is None:
        return "the family's experts compute an activation or gate the kernels do not have"
    gu, dn = entry.get(maths.gate_up), entry.get(maths.down)
    if gu is None or dn is None:
        return f"no {maths.gate_up} / {maths.down} tensors"
    fg, fd = projection_format(gu, maths.transposed), projection_format(dn, maths.transposed)
    if fg is None or fd is None:
        what = gu if fg is None else dn
        kind = what.layout.kind if isinstance(what, StoredTensor) else str(what.dtype).removeprefix("torch.")
        return f"the kernels cannot read {kind} {maths.gate_up if fg is None else maths.down} weights"
    for name, attr in ((maths.gate_up_bias, "fg"), (maths.down_bias, "fd")):
        if name is not None:
            bias = _vector(entry.get(name))
            if bias is None:
                return f"bias {name} is not a vector the kernels read"
            if attr == "fg":
                fg = replace(fg, bias=bias.dtype)
            else:
                fd = replace(fd, bias=bias.dtype)
    rows, cols = gu.shape  # the model's shape: [2I, H], or [H, 2I] when the model holds [in, out]
    two_i, hidden = (cols, rows) if maths.transposed else (rows, cols)
    if two_i % 2:
        return f"{maths.gate_up} has an odd number of rows ({two_i})"
    try:
        spec = MoELayerSpec(
            num_experts,
            int(hidden),
            two_i // 2,
            fg,
            fd,
            activation=maths.activation,
            glu_layout=maths.glu_layout,
            alpha=float(maths.alpha),
            limit=float(maths.limit),
        )
    except ValueError as exc:  # InvalidArgumentError: a shape the spec refuses
        return str(exc)
    return spec.unsupported() or spec


def kernel_weights(maths: KernelMaths, entry: Entry) -> ExpertWeights:
    """One expert's tensors as the kernels read them (views of ``entry``: no copy)."""

    def parts(t):
        if isinstance(t, StoredTensor):
            return t.layout.kernel_tensors(t.tensors)
        return t, None, None

    gw, gs, gz = parts(entry[maths.gate_up])
    dw, ds, dz = parts(entry[maths.down])
    gb = _vector(entry[maths.gate_up_bias]) if maths.gate_up_bias is not None else None
    db = _vector(entry[maths.down_bias]) if maths.down_bias is not None else None
    return ExpertWeights(gw, dw, gs, ds, gz, dz, gb, db)


class ExpertKernel:
    """A :class:`~moe_patch.kernels.MoEKernel` over ``num_experts`` entries (a layer's experts, or an engine's
    slots) with a family's maths. :attr:`calls` counts its layer calls (tests prove the kernel path ran).

    Raises :class:`~moe_patch.kernels.KernelUnavailableError` (with the reason) where the kernels cannot run
    this layer; the caller keeps torch's path.
    """

    def __init__(
        self, maths: KernelMaths | None, num_experts: int, example: Entry, *, gemm_min_rows: float | str | None = "auto"
    ):
        if not available():
            from ..kernels import status

            raise KernelUnavailableError(status().reason)
        spec = layer_spec(maths, num_experts, example)
        if isinstance(spec, str):
            raise KernelUnavailableError(spec)
        self.maths, self.spec = maths, spec
        self.kernel = MoEKernel(spec, gemm_min_rows=gemm_min_rows)
        self.calls = 0

    def attach(self, index: int, entry: Entry) -> None:
        """Entry ``index`` computes from ``entry``'s tensors (referenced, not copied) until :meth:`detach`."""
        self.kernel.set_expert(index, kernel_weights(self.maths, entry))

    def detach(self, index: int) -> None:
        self.kernel.set_expert(index, None)

    def attached(self, index: int) -> bool:
        return self.kernel.has_expert(index)

    def forward(
        self,
        x: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        accumulate: bool = False,
        weight_inputs: bool = False,
    ) -> torch.Tensor:
        """The routed experts of ``x [T, H]`` over the attached entries (ids of detached ones, or outside the
        range, are skipped): see :meth:`moe_patch.kernels.MoEKernel.forward`."""
        self.calls += 1
        return self.kernel.forward(
            x, top_k_index, top_k_weights, out, accumulate=accumulate, weight_inputs=weight_inputs
        )


def meta_entry(entry: Entry) -> dict[str, Any]:
    """``entry`` with meta tensors of the same shapes and dtypes (to plan a kernel before any data exists)."""

    def meta(t):
        if isinstance(t, StoredTensor):
            return StoredTensor(t.layout, tuple(torch.empty(p.shape, dtype=p.dtype, device="meta") for p in t.tensors))
        return torch.empty(t.shape, dtype=t.dtype, device="meta")

    return {n: meta(t) for n, t in entry.items()}


#: the resident experts' kernel, kept on the module (records.CACHE_PREFIX: unpatch drops it)
_KERNEL_ATTR = "_moe_patch_cache_expert_kernel"


def module_kernel(experts: torch.nn.Module) -> ExpertKernel | None:
    """The kernel over a resident decorated experts module's own parameters (views, no copy), kept on the module
    for as long as its weights are the same tensors in the same place and dtype (rebuilt when they move); None
    where the kernels cannot compute it (family maths, format, device, or kernels off)."""
    from .fused import decorated_kernel_maths

    maths = decorated_kernel_maths(experts)
    names = (
        []
        if maths is None
        else [n for n in (maths.gate_up, maths.down, maths.gate_up_bias, maths.down_bias) if n is not None]
    )
    params = {n: getattr(experts, n, None) for n in names}
    if maths is None or any(not isinstance(p, torch.Tensor) or p.device.type != "cpu" for p in params.values()):
        return None
    key = tuple((p.data_ptr(), p.dtype, p.stride(), p.shape) for p in params.values())

    def build() -> ExpertKernel | None:
        stacked = {n: p.detach() for n, p in params.items()}
        num = stacked[maths.gate_up].shape[0]
        try:
            kernel = ExpertKernel(maths, num, {n: t[0] for n, t in stacked.items()})
            for e in range(num):
                kernel.attach(e, {n: t[e] for n, t in stacked.items()})
        except (KernelUnavailableError, InvalidArgumentError):  # e.g. weights made non-contiguous: torch's path
            return None
        return kernel

    return derived(experts, _KERNEL_ATTR, key, build)


def _measure_kernel_wins(dtype: torch.dtype) -> float:
    """For each row count of :data:`LOOP_BUCKETS`, whether the CPU expert kernel (:mod:`moe_patch.kernels`)
    beats transformers' grouped_mm experts forward on the same resident experts (a bit per bucket); 0 where the
    kernels do not run."""
    from transformers import Qwen3MoeConfig
    from transformers.integrations.moe import grouped_mm_experts_forward
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    experts = 4  # small enough to time in about a second per dtype on 2 cores
    cfg = Qwen3MoeConfig(hidden_size=1024, moe_intermediate_size=512, num_experts=experts, num_experts_per_tok=1)
    gen = torch.Generator().manual_seed(0)
    module = Qwen3MoeExperts(cfg).to(dtype).requires_grad_(False)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    kernel = module_kernel(module)
    if kernel is None:
        return 0.0
    bits = 0
    for i, rows in enumerate(LOOP_BUCKETS):
        x = torch.randn(experts * rows, 1024, generator=gen).to(dtype)
        idx = torch.arange(experts).repeat_interleave(rows).unsqueeze(1)
        w = torch.ones(experts * rows, 1, dtype=dtype)
        with torch.no_grad():
            grouped, fused = best_seconds(
                functools.partial(grouped_mm_experts_forward, module, x, idx, w),
                functools.partial(kernel.forward, x, idx, w),
            )
        if fused < 0.95 * grouped:
            bits |= 1 << i
    return float(bits)


def kernel_wins(dtype: torch.dtype, rows_per_expert: float) -> bool:
    """Whether, on this machine's CPU, the CPU expert kernel beats transformers' grouped_mm at this many rows
    per expert (the nearest measured bucket; measured once per machine, threads and torch)."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    bits = int(
        CALIBRATIONS.get(f"cpu_kernel_wins/{str(dtype).removeprefix('torch.')}", lambda: _measure_kernel_wins(dtype))
    )
    nearest = min(
        range(len(LOOP_BUCKETS)), key=lambda i: abs(math.log2(LOOP_BUCKETS[i]) - math.log2(max(rows_per_expert, 1)))
    )
    return bool(bits >> nearest & 1)
