"""A gate_up projection stored as two tensors (``ExpertFormat.split``): gate and up apart, each with its own
scale grid and zero points, as DeepSeek/Qwen3/MiniMax FP8 and Kimi int4 checkpoints store them. The kernels read
the halves through two pointers; the result is that of the decoders applied to each half, then a float64 layer.
"""

from __future__ import annotations

import pytest
import torch

from moe_patch.errors import InvalidArgumentError
from moe_patch.kernels import ExpertFormat, ExpertWeights, KernelUnavailableError, MoEKernel, MoELayerSpec
from tests.kernels.kernel_reference import _act, decoded, make_projection, rel_err
from tests.kernels.test_kernel_formats import TOL, routing

pytestmark = pytest.mark.usefixtures("kernel_status")

# name: (format of each half, hidden, intermediate): intermediates not a multiple of the blocks, so each half
# has a ragged last block row (a [gate; up] stack would have a different scale grid than the two halves)
SPLIT = {
    "fp8_block32": (ExpertFormat("fp8", block=(32, 32), split=True), 64, 40),
    "fp8_block128_ue8m0": (ExpertFormat("fp8", block=(128, 128), scale_dtype=torch.uint8, split=True), 256, 72),
    "fp8_channel": (ExpertFormat("fp8", scale_dtype=torch.bfloat16, split=True), 64, 20),
    "fp8_tensor": (ExpertFormat("fp8", per_tensor=True, split=True), 64, 20),
    "int4_g32_zero_points": (
        ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16, zero_point=True, split=True),
        64,
        12,
    ),
    "int4_g32": (ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16, split=True), 96, 40),
    "bf16": (ExpertFormat("bf16", split=True), 48, 20),
}


def _one(fmt: ExpertFormat, rows: int, cols: int, gen):
    return make_projection(fmt, rows, cols, gen)


def _halves_layer(name: str, gen, experts: int = 3):
    fmt, hidden, inter = SPLIT[name]
    whole = ExpertFormat(fmt.kind, fmt.block, fmt.per_tensor, fmt.group_size, fmt.scale_dtype, fmt.zero_point)
    down = ExpertFormat("bf16")
    spec = MoELayerSpec(experts, hidden, inter, fmt, down)
    stored = [
        (_one(whole, inter, hidden, gen), _one(whole, inter, hidden, gen), _one(down, hidden, inter, gen))
        for _ in range(experts)
    ]
    layer = MoEKernel(spec, gemm_min_rows=None)

    def pair(a, b):
        return None if a is None else (a, b)

    for e, (g, u, d) in enumerate(stored):
        layer.set_expert(
            e,
            ExpertWeights(
                (g.weight, u.weight), d.weight, pair(g.scale, u.scale), None, pair(g.zero_point, u.zero_point)
            ),
        )
    return spec, whole, stored, layer


def _reference(spec, whole, stored, x, idx, wts, compute):
    rnd = (lambda t: t.to(compute).double()) if compute == torch.bfloat16 else (lambda t: t.float().double())
    tokens, k = idx.shape
    out = torch.zeros(tokens, spec.hidden, dtype=torch.float64)
    for e, (g, u, d) in enumerate(stored):
        slots = (idx.reshape(-1) == e).nonzero().flatten()
        if not slots.numel():
            continue
        wg = torch.cat(
            [
                decoded(whole, g, spec.intermediate, spec.hidden, compute),
                decoded(whole, u, spec.intermediate, spec.hidden, compute),
            ]
        )
        wd = decoded(spec.down, d, spec.hidden, spec.intermediate, compute)
        t = slots // k
        y = rnd(_act(spec, rnd(x[t]) @ wg.T)) @ wd.T
        out.index_add_(0, t, y * wts.reshape(-1)[slots, None].double())
    return out


@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", SPLIT)
def test_gate_and_up_stored_apart_read_through_two_pointers(name, compute, tokens, gen):
    spec, whole, stored, layer = _halves_layer(name, gen)
    idx, wts = routing(tokens, 2, spec.num_experts, gen)
    x = torch.randn(tokens, spec.hidden, generator=gen).to(compute)
    out = layer.forward(x, idx, wts, torch.zeros(tokens, spec.hidden))
    assert rel_err(out, _reference(spec, whole, stored, x, idx, wts, compute)) <= TOL[compute]


@pytest.mark.parametrize("name", ["fp8_block32", "int4_g32_zero_points"])
def test_decode_of_a_split_projection_is_both_halves_decoded(name, gen):
    spec, whole, stored, layer = _halves_layer(name, gen)
    g, u, _ = stored[1]
    want = torch.cat(
        [
            decoded(whole, g, spec.intermediate, spec.hidden, torch.float32),
            decoded(whole, u, spec.intermediate, spec.hidden, torch.float32),
        ]
    ).float()
    assert torch.equal(layer.decode(1, "gate_up", torch.float32), want)


def test_split_needs_pairs_halves_layout_and_a_whole_down(gen):
    spec, whole, stored, layer = _halves_layer("fp8_block32", gen)
    g, u, d = stored[0]
    with pytest.raises(InvalidArgumentError, match="two halves.*pair"):
        layer.set_expert(0, ExpertWeights(g.weight, d.weight, g.scale))
    with pytest.raises(InvalidArgumentError, match=r"second half\) scale has shape"):
        layer.set_expert(0, ExpertWeights((g.weight, u.weight), d.weight, (g.scale, g.scale[:1])))
    fmt = SPLIT["fp8_block32"][0]
    with pytest.raises(KernelUnavailableError, match="glu layout must be 'halves'"):
        MoEKernel(MoELayerSpec(2, 64, 24, fmt, ExpertFormat("bf16"), glu_layout="interleaved"))
    with pytest.raises(KernelUnavailableError, match="down projection is one tensor"):
        MoEKernel(MoELayerSpec(2, 64, 24, ExpertFormat("bf16"), ExpertFormat("bf16", split=True)))
    with pytest.raises(InvalidArgumentError, match="pair of tensors for a projection stored as one"):
        MoEKernel(MoELayerSpec(2, 64, 24, ExpertFormat("bf16"), ExpertFormat("bf16"))).set_expert(
            0,
            ExpertWeights((torch.zeros(24, 64, dtype=torch.bfloat16),) * 2, torch.zeros(64, 24, dtype=torch.bfloat16)),
        )
