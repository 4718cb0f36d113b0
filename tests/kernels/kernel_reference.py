"""Test data and the float64 reference the kernels are checked against.

Stored tensors are made by the project's own quantizers (``moe_patch.testing.quantized``) and
compressed-tensors' packer; weights are decoded by the project's torch decoders
(``moe_patch/formats/{fp8,mxfp4,compressed}.py``, themselves checked bit for bit against transformers), then the
layer is computed in float64. The reference rounds where the kernels' documented semantics round
(activations to the compute dtype), so what remains is fp32 accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers.activations import ACT2FN
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from moe_patch.formats.compressed import dequantize_int, unpack_int
from moe_patch.formats.fp8 import dequantize_fp8
from moe_patch.formats.mxfp4 import dequantize_mxfp4
from moe_patch.kernels import ExpertFormat, ExpertWeights, MoELayerSpec
from moe_patch.testing.quantized import quantize_fp8_block, quantize_int_group, quantize_mxfp4


def pack_int(q: torch.Tensor, bits: int, packed_dim: int = 1) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.to(torch.int8), bits, packed_dim=packed_dim)


@dataclass
class Stored:
    """One projection's stored tensors."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def make_projection(
    fmt: ExpertFormat,
    rows: int,
    cols: int,
    gen: torch.Generator,
    *,
    codes: str = "random",
    scale_range: tuple[float, float] | None = None,
) -> Stored:
    """Random stored tensors of ``fmt``. ``codes="all"`` cycles through every code of the format;
    ``scale_range`` draws scales log-uniformly from it (exponent bytes for e8m0)."""
    w = torch.randn(rows, cols, generator=gen) * 0.5
    bias = (torch.randn(rows, generator=gen) * 0.1).to(fmt.bias) if fmt.bias is not None else None
    every = torch.arange(rows * cols).reshape(rows, cols)
    if fmt.kind in ("bf16", "fp16", "fp32"):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt.kind]
        return Stored(w.to(dtype), bias=bias)
    if fmt.kind == "fp8":
        block = (rows, cols) if fmt.per_tensor else fmt.block
        q, s = quantize_fp8_block(w, block, "ue8m0" if fmt.scale_dtype == torch.uint8 else "float")
        if codes == "all":  # every byte, NaN codes (read as 480 by the decoders) included
            q = (every % 256).to(torch.uint8).view(torch.float8_e4m3fn)
        if scale_range is not None:
            s = _log_uniform(s.shape, scale_range, gen, e8m0=fmt.scale_dtype == torch.uint8)
        if fmt.per_tensor:
            s = s.reshape(())
        elif fmt.scale_dtype not in (None, torch.float32, torch.uint8):
            s = s.to(fmt.scale_dtype)
        return Stored(q.contiguous(), s.contiguous(), bias=bias)
    if fmt.kind == "mxfp4":
        blocks, scales = quantize_mxfp4(w)
        if codes == "all":
            blocks = (every[:, : cols // 2] % 256).to(torch.uint8).reshape(rows, cols // 32, 16)
        if scale_range is not None:
            scales = _log_uniform(scales.shape, scale_range, gen, e8m0=True)
        return Stored(blocks.contiguous(), scales.contiguous(), bias=bias)
    bits = 4 if fmt.kind == "int4" else 8
    group = fmt.group_size or cols
    q, scale = quantize_int_group(w.to(fmt.scale_dtype or torch.float32), bits, group)
    if codes == "all":
        q = (every % (1 << bits) - (1 << (bits - 1))).to(torch.int8)
    if scale_range is not None:
        scale = _log_uniform(scale.shape, scale_range, gen).to(scale.dtype)
    zp = None
    if fmt.zero_point:
        zp = pack_int(
            torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (rows, scale.shape[1]), generator=gen),
            bits,
            packed_dim=0,
        )
    return Stored(pack_int(q, bits), scale.contiguous(), zp, bias)


def _log_uniform(shape, bounds: tuple[float, float], gen: torch.Generator, *, e8m0: bool = False) -> torch.Tensor:
    lo, hi = (math.log2(b) for b in bounds)
    e = torch.rand(shape, generator=gen) * (hi - lo) + lo
    if e8m0:
        return (e.round() + 127).clamp(0, 254).to(torch.uint8)
    return torch.exp2(e)


def expert_weights(gu: Stored, dn: Stored) -> ExpertWeights:
    return ExpertWeights(gu.weight, dn.weight, gu.scale, dn.scale, gu.zero_point, dn.zero_point, gu.bias, dn.bias)


def make_experts(spec: MoELayerSpec, gen: torch.Generator, **kw) -> list[tuple[Stored, Stored]]:
    return [
        (
            make_projection(spec.gate_up, *spec.gate_up_shape, gen, **kw),
            make_projection(spec.down, *spec.down_shape, gen, **kw),
        )
        for _ in range(spec.num_experts)
    ]


# --------------------------------------------------------------------------- decoding
def _expand(scale: torch.Tensor, block: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def _fp8_exact(q: torch.Tensor) -> torch.Tensor:
    """e4m3 values in float64, NaN codes as 480 (the decoders' reading)."""
    v = q.to(torch.float64)
    nan = (q.view(torch.uint8) & 0x7F) == 0x7F
    return torch.where(nan, torch.where(q.view(torch.uint8) >= 0x80, -480.0, 480.0).to(torch.float64), v)


def decoded(fmt: ExpertFormat, st: Stored, rows: int, cols: int, compute: torch.dtype) -> torch.Tensor:
    """The weights the kernels compute with (float64), per the documented semantics: the torch decoder's value
    in the compute dtype, except in bf16 for FP8 and symmetric integer formats, whose scale is applied to each
    block's fp32 sum (the exact product)."""
    exact = compute == torch.bfloat16 and (fmt.kind == "fp8" or (fmt.kind in ("int4", "int8") and not fmt.zero_point))
    if fmt.kind in ("bf16", "fp16", "fp32"):
        return st.weight.to(compute).double()
    if fmt.kind == "fp8":
        if not exact:
            block = None if fmt.per_tensor else fmt.block
            return dequantize_fp8(st.weight, st.scale, block, compute).double()
        s = st.scale.double() if st.scale.dtype != torch.uint8 else torch.exp2(st.scale.double() - 127)
        if fmt.per_tensor:
            s = s.reshape(1, 1).expand(rows, cols)
        elif fmt.block is None:
            s = s.reshape(rows, 1).expand(rows, cols)
        else:
            s = _expand(s, fmt.block, rows, cols)
        return _fp8_exact(st.weight) * s
    if fmt.kind == "mxfp4":
        return dequantize_mxfp4(st.weight, st.scale, compute).double()
    bits = 4 if fmt.kind == "int4" else 8
    group = fmt.group_size if fmt.group_size and fmt.group_size < cols else None
    if not exact:
        return dequantize_int(
            st.weight, st.scale, st.zero_point, bits=bits, group_size=group, shape=(rows, cols), dtype=compute
        ).double()
    q = unpack_int(st.weight, bits, cols).double()
    return q * _expand(st.scale.double().reshape(rows, -1), (1, group or cols), rows, cols)


# --------------------------------------------------------------------------- the layer
def _act(spec: MoELayerSpec, h: torch.Tensor) -> torch.Tensor:
    """The activation as transformers computes it: gpt-oss's own ``_apply_gate``, ``ACT2FN`` otherwise."""
    if spec.glu_layout == "interleaved":
        g, u = h[..., 0::2], h[..., 1::2]
    else:
        g, u = h.chunk(2, dim=-1)
    if spec.activation == "gpt_oss":
        interleaved = torch.stack([g, u], dim=-1).flatten(-2)
        return GptOssExperts._apply_gate(SimpleNamespace(alpha=spec.alpha, limit=spec.limit), interleaved)
    return ACT2FN["gelu_pytorch_tanh" if spec.activation == "gelu_tanh" else "silu"](g) * u


def reference(
    spec: MoELayerSpec,
    experts: list,
    x: torch.Tensor,
    idx: torch.Tensor,
    wts: torch.Tensor,
    compute: torch.dtype,
    *,
    weight_inputs: bool = False,
    stage: str = "forward",
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 result of the layer for ``experts`` (None entries: detached, skipped) and ids outside [0, E)
    skipped. ``stage``: ``forward``, ``gate_up`` ([T*k, 2I] projections) or ``down`` (from ``a``)."""
    rnd = (lambda t: t.to(compute).double()) if compute == torch.bfloat16 else (lambda t: t.float().double())
    tokens, k = idx.shape
    weights = {}
    out = torch.zeros(tokens, spec.hidden, dtype=torch.float64)
    h_all = torch.zeros(tokens * k, 2 * spec.intermediate, dtype=torch.float64)
    for e in range(spec.num_experts):
        if experts[e] is None:
            continue
        slots = (idx.reshape(-1) == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        gu, dn = experts[e]
        if e not in weights:
            weights[e] = (
                decoded(spec.gate_up, gu, *spec.gate_up_shape, compute),
                decoded(spec.down, dn, *spec.down_shape, compute),
            )
        wg, wd = weights[e]
        t = slots // k
        w = wts.reshape(-1)[slots].float().double()
        if stage == "down":
            act = rnd(a[slots])
        else:
            xin = rnd(x[t].float() * wts.reshape(-1)[slots, None].float()) if weight_inputs else rnd(x[t])
            h = xin @ wg.T
            if gu.bias is not None:
                h = h + gu.bias.double()
            if stage == "gate_up":
                h_all[slots] = h
                continue
            act = rnd(_act(spec, h))
        y = act @ wd.T
        if dn.bias is not None:
            y = y + dn.bias.double()
        out.index_add_(0, t, y if weight_inputs else y * w[:, None])
    return h_all if stage == "gate_up" else out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest relative error over the rows (token-wise 2-norm; rows whose reference is zero compare absolutely)."""
    d = (out.double() - ref).norm(dim=-1)
    n = ref.norm(dim=-1)
    return float(torch.where(n > 0, d / n.clamp(min=1e-300), d).max()) if out.numel() else 0.0
