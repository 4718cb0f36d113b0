"""Every stored format through the kernels equals the torch decoders followed by a float64 layer.

Tolerances (largest token-wise relative error, see moe_patch/kernels/README.md): fp32 compute within 1e-5;
bf16 compute within 2e-3 of a reference that rounds activations to bf16 where the kernels do. What remains
there is fp32 accumulation (~1e-7) and activations whose bf16 rounding falls the other way because their fp32
value differs in the last bits from float64's: each such flip moves one activation by one bf16 ulp (2**-8),
about 2**-8 / sqrt(intermediate) of the output (3e-4 measured at intermediate 72); 2e-3 bounds several.
"""

from __future__ import annotations

import pytest
import torch

from moe_patch.formats.mxfp4 import dequantize_mxfp4
from moe_patch.kernels import ExpertFormat, MoEKernel, MoELayerSpec
from tests.kernels.kernel_reference import decoded, expert_weights, make_experts, reference, rel_err

pytestmark = pytest.mark.usefixtures("kernel_status")  # skipped where the kernels cannot run

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3}

# name: (format, hidden, intermediate): the dimensions are ragged where the format allows it
FORMATS = {
    "bf16": (ExpertFormat("bf16"), 70, 37),
    "fp16": (ExpertFormat("fp16"), 64, 40),
    "fp32": (ExpertFormat("fp32"), 48, 24),
    "fp8_block128": (ExpertFormat("fp8", block=(128, 128)), 200, 72),
    "fp8_block32_ue8m0": (ExpertFormat("fp8", block=(32, 32), scale_dtype=torch.uint8), 96, 50),
    "fp8_channel_bf16_scale": (ExpertFormat("fp8", scale_dtype=torch.bfloat16), 80, 36),
    "fp8_tensor": (ExpertFormat("fp8", per_tensor=True), 64, 33),
    "mxfp4": (ExpertFormat("mxfp4"), 96, 64),
    "int4_g32_bf16": (ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16), 96, 64),
    "int4_g128_f32": (ExpertFormat("int4", group_size=128, scale_dtype=torch.float32), 256, 128),
    "int4_channel_f16": (ExpertFormat("int4", scale_dtype=torch.float16), 72, 44),
    "int4_g32_zero_points": (ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16, zero_point=True), 64, 32),
    "int8_channel_bf16": (ExpertFormat("int8", scale_dtype=torch.bfloat16), 70, 36),
    "int8_g32_zero_points": (ExpertFormat("int8", group_size=32, scale_dtype=torch.float32, zero_point=True), 64, 64),
}
COMPUTE = [torch.bfloat16, torch.float32]


def build(spec: MoELayerSpec, experts, **kw) -> MoEKernel:
    """The kernel layer for ``experts`` (None: not attached); the fused kernel at every row count unless
    ``gemm_min_rows`` says otherwise (the GEMM path has tests of its own)."""
    kw.setdefault("gemm_min_rows", None)
    layer = MoEKernel(spec, **kw)
    for e, pair in enumerate(experts):
        if pair is not None:
            layer.set_expert(e, expert_weights(*pair))
    return layer


def routing(tokens: int, k: int, experts: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    return idx.contiguous(), torch.rand(tokens, k, generator=gen) + 0.1


def run_case(spec, experts, compute, gen, *, tokens=7, k=2, isa=None, idx=None, wts=None):
    layer = build(spec, experts, isa=isa)
    if idx is None:
        idx, wts = routing(tokens, k, spec.num_experts, gen)
    x = torch.randn(idx.shape[0], spec.hidden, generator=gen).to(compute)
    out = layer.forward(x, idx, wts, torch.zeros(idx.shape[0], spec.hidden))
    return out, reference(spec, experts, x, idx, wts, compute), layer


@pytest.mark.parametrize("compute", COMPUTE, ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_each_format_matches_the_decoders_on_every_variant(name, compute, variants, gen):
    fmt, hidden, inter = FORMATS[name]
    spec = MoELayerSpec(4, hidden, inter, fmt, fmt)
    experts = make_experts(spec, gen)
    outs = {}
    for isa in variants:
        out, ref, layer = run_case(spec, experts, compute, torch.Generator().manual_seed(7), isa=isa)
        assert layer.last_variant == (isa if compute == torch.bfloat16 or isa != "avx512bf16" else "avx512")
        assert rel_err(out, ref) <= TOL[compute], (isa, rel_err(out, ref))
        outs[isa] = out
    # the variants differ only in summation order
    first = next(iter(outs.values()))
    for out in outs.values():
        assert rel_err(out, first.double()) <= 2e-6


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 16, 64, 512])
@pytest.mark.parametrize(
    "name", ["bf16", "fp8_block128", "mxfp4", "int4_g32_bf16", "int8_channel_bf16", "int4_g32_zero_points"]
)
def test_one_to_512_rows_per_expert(name, rows, gen):
    """Every register tile (1..8 rows) and the buffered path above them give the layer's result."""
    fmt, hidden, inter = FORMATS[name]
    spec = MoELayerSpec(3, hidden, inter, fmt, fmt)
    experts = make_experts(spec, gen)
    idx = torch.tensor([[0, 2]]).expand(rows, 2).contiguous()  # every token to experts 0 and 2
    wts = torch.rand(rows, 2, generator=gen)
    for compute in COMPUTE:
        out, ref, _ = run_case(spec, experts, compute, gen, idx=idx, wts=wts)
        assert rel_err(out, ref) <= TOL[compute], (compute, rel_err(out, ref))


@pytest.mark.parametrize("compute", COMPUTE, ids=str)
@pytest.mark.parametrize(
    "name",
    [
        "fp8_block128",
        "fp8_block32_ue8m0",
        "mxfp4",
        "int4_g32_bf16",
        "int4_channel_f16",
        "int8_channel_bf16",
        "int4_g32_zero_points",
        "int8_g32_zero_points",
    ],
)
def test_every_code(name, compute, gen):
    """Each FP8 byte (subnormals and the NaN codes the decoders read as 480), FP4 code and integer code."""
    fmt, hidden, inter = FORMATS[name]
    spec = MoELayerSpec(2, hidden, inter, fmt, fmt)
    experts = make_experts(spec, gen, codes="all")
    out, ref, _ = run_case(spec, experts, compute, gen, tokens=5)
    assert rel_err(out, ref) <= TOL[compute]


@pytest.mark.parametrize("compute", COMPUTE, ids=str)
@pytest.mark.parametrize(
    "name",
    [
        "fp8_block128",
        "fp8_channel_bf16_scale",
        "fp8_block32_ue8m0",
        "fp8_tensor",
        "mxfp4",
        "int4_g32_bf16",
        "int8_channel_bf16",
        "int4_g32_zero_points",
    ],
)
def test_extreme_scales(name, compute, gen):
    """Scales spread over 48 binades within one matrix (2**-24 .. 2**24: the layer squares them through
    gate * up and stays finite in fp32); the e8m0 extremes 2**-127 .. 2**128 are the decode test's."""
    bounds = (2.0**-24, 2.0**24)
    fmt, hidden, inter = FORMATS[name]
    spec = MoELayerSpec(2, hidden, inter, fmt, fmt)
    experts = make_experts(spec, gen, scale_range=bounds)
    out, ref, _ = run_case(spec, experts, compute, gen, tokens=3)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL[compute]


@pytest.mark.parametrize("name", FORMATS)
def test_decode_is_the_decoders_value(name, gen):
    """The dense decode gives the torch decoders' values bit for bit: fp32, and bf16 where the decoder rounds
    once (fp16 integer scales round twice there)."""
    fmt, hidden, inter = FORMATS[name]
    spec = MoELayerSpec(1, hidden, inter, fmt, fmt)
    experts = make_experts(spec, gen, codes="all" if fmt.kind in ("fp8", "mxfp4") else "random")
    layer = build(spec, experts)
    gu, dn = experts[0]
    for dtype in (torch.float32, torch.bfloat16):
        if dtype == torch.bfloat16 and fmt.scale_dtype == torch.float16:
            continue
        for proj, st, shape in (("gate_up", gu, spec.gate_up_shape), ("down", dn, spec.down_shape)):
            ours = layer.decode(0, proj, dtype)
            if dtype == torch.bfloat16 and fmt.kind in ("fp8", "int4", "int8") and not fmt.zero_point:
                want = decoded(fmt, st, *shape, torch.float32)  # the exact product, then one bf16 rounding below
                if fmt.kind == "fp8":
                    want = decoded(fmt, st, *shape, torch.bfloat16).to(torch.float32)
                want = want.to(torch.bfloat16)
            else:
                want = decoded(fmt, st, *shape, dtype).to(dtype)
            assert torch.equal(ours, want), (proj, dtype)


def test_every_fp8_ue8m0_scale_byte_decodes_like_the_decoder(gen):
    fmt = ExpertFormat("fp8", block=(1, 32), scale_dtype=torch.uint8)
    spec = MoELayerSpec(1, 64, 128, fmt, fmt)
    from moe_patch.formats.fp8 import dequantize_fp8
    from moe_patch.kernels import ExpertWeights

    q = torch.randint(0, 256, (256, 64), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    scales = torch.stack([torch.arange(256, dtype=torch.uint8), torch.arange(255, -1, -1).to(torch.uint8)], 1)
    layer = MoEKernel(spec)
    layer.set_expert(
        0,
        ExpertWeights(
            q, torch.zeros(64, 128).to(torch.float8_e4m3fn), scales, torch.full((64, 4), 127, dtype=torch.uint8)
        ),
    )
    for dtype in (torch.float32, torch.bfloat16):
        ours, want = layer.decode(0, "gate_up", dtype), dequantize_fp8(q, scales, (1, 32), dtype)
        assert torch.equal(ours.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(want))


def test_every_mxfp4_scale_byte_decodes_like_transformers(gen):
    """All 256 e8m0 exponents (2**-127 subnormal, 2**128 = inf) against the decoder, fp32 and bf16."""
    spec = MoELayerSpec(1, 32, 128, ExpertFormat("mxfp4"), ExpertFormat("mxfp4"))
    blocks = torch.randint(0, 256, (256, 1, 16), dtype=torch.uint8, generator=gen)
    scales = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    layer = MoEKernel(spec)
    from moe_patch.kernels import ExpertWeights

    down = torch.zeros(32, 4, 16, dtype=torch.uint8)
    layer.set_expert(0, ExpertWeights(blocks, down, scales, torch.full((32, 4), 127, dtype=torch.uint8)))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(layer.decode(0, "gate_up", dtype).isnan(), dequantize_mxfp4(blocks, scales, dtype).isnan())
        ours, want = layer.decode(0, "gate_up", dtype), dequantize_mxfp4(blocks, scales, dtype)
        assert torch.equal(torch.nan_to_num(ours), torch.nan_to_num(want))
