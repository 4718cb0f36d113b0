"""The kernels' attention of a few query rows (:func:`moe_patch.kernels.attention.attend`) against a float64
softmax attention: grouped-query heads read in place, bool and additive masks (broadcast over batch and heads),
causal rows without a mask, gpt-oss's sink logits, fully masked rows, strided queries, head sizes that are not a
multiple of the vector width, every instruction-set variant this CPU runs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_patch.errors import InvalidArgumentError
from moe_patch.kernels import KERNELS
from moe_patch.kernels.attention import attend
from moe_patch.testing.compare import rel_diff

#: bound against float64, relative to the largest output: one rounding of the output, or fp32 sums
BOUND = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 1e-6}


def reference(q, k, v, scale, mask=None, sinks=None, causal=False):
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Tq, _ = q.shape
    S, g = k.shape[2], Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    elif causal:
        s = s.masked_fill(torch.arange(S)[None] > S - Tq + torch.arange(Tq)[:, None], -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double().reshape(1, -1, 1, 1).expand(B, -1, Tq, 1)], -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with nothing to attend: zeros
    if sinks is not None:
        p = p[..., :-1]
    return (p @ v).transpose(1, 2)


def inputs(B, Hq, Hkv, Tq, S, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=gen).to(dtype).transpose(1, 2)  # as the attention modules pass it
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    return q, k, v, gen


SHAPES = [
    (1, 8, 2, 1, 37, 64),
    (2, 4, 4, 3, 19, 40),
    (1, 64, 8, 1, 300, 64),
    (1, 32, 4, 2, 70, 128),
    (1, 6, 2, 1, 33, 64),
    (3, 6, 3, 16, 16, 8),
    (1, 2, 1, 2, 1, 17),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, Hq, Hkv, Tq, S, D", SHAPES)
def test_attention_matches_a_float64_softmax(dtype, B, Hq, Hkv, Tq, S, D, kernel_status):
    q, k, v, gen = inputs(B, Hq, Hkv, Tq, S, D, dtype)
    keep = torch.rand(B, 1, Tq, S, generator=gen) > 0.3
    keep[..., -1] = True
    additive = torch.where(keep, 0.0, torch.finfo(torch.float32).min).to(dtype)
    sinks = torch.randn(Hq, generator=gen).to(dtype)
    cases = {
        "no mask": {},
        "causal": {"causal": True},
        "bool mask": {"mask": keep},
        "additive mask": {"mask": additive},
        "sinks": {"sinks": sinks, "causal": True},
        "sinks and mask": {"sinks": sinks, "mask": additive},
    }
    for name, kw in cases.items():
        got = attend(q, k, v, scale=D**-0.5, **kw)
        assert got.shape == (B, Tq, Hq, D) and got.dtype == dtype, name
        assert rel_diff(got.double(), reference(q, k, v, D**-0.5, **kw)) <= BOUND[dtype], name


def test_masks_per_head_and_rows_with_nothing_to_attend(kernel_status):
    q, k, v, gen = inputs(2, 4, 2, 2, 9, 16, torch.float32, seed=1)
    keep = torch.rand(2, 4, 2, 9, generator=gen) > 0.5
    keep[0, 1, 0] = False  # one row of one head attends to nothing
    got = attend(q, k, v, scale=0.25, mask=keep)
    assert rel_diff(got.double(), reference(q, k, v, 0.25, mask=keep)) <= 1e-6
    assert torch.equal(got[0, 0, 1], torch.zeros(16))
    sinks = torch.randn(4, generator=gen)  # with a sink the row still has a column: its output is zeros too
    assert torch.equal(attend(q, k, v, scale=0.25, mask=keep, sinks=sinks)[0, 0, 1], torch.zeros(16))


def test_every_variant_this_cpu_runs_gives_the_same_result(variants, monkeypatch):
    q, k, v, gen = inputs(1, 8, 2, 2, 33, 64, torch.bfloat16, seed=2)  # every variant's fast paths (D = 64)
    sinks = torch.randn(8, generator=gen)
    want = reference(q, k, v, 0.2, sinks=sinks, causal=True)
    for name in variants:
        monkeypatch.setenv("MOE_PATCH_KERNELS_ISA", name)
        KERNELS.reset()
        assert rel_diff(attend(q, k, v, scale=0.2, sinks=sinks, causal=True).double(), want) <= 2**-8, name
    monkeypatch.delenv("MOE_PATCH_KERNELS_ISA")
    KERNELS.reset()


def test_long_caches_spread_over_threads_give_the_single_thread_numbers(kernel_status):
    q, k, v, _ = inputs(1, 16, 4, 1, 4096, 64, torch.bfloat16, seed=3)  # above the size that goes parallel
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = attend(q, k, v, scale=0.125)
        torch.set_num_threads(2)
        assert torch.equal(attend(q, k, v, scale=0.125), one)  # each row summed by one thread, in a fixed order
    finally:
        torch.set_num_threads(threads)


def test_impossible_arguments_are_refused_with_one_line(kernel_status):
    q, k, v, _ = inputs(1, 6, 4, 1, 5, 8, torch.float32)
    with pytest.raises(InvalidArgumentError, match="not a multiple"):
        attend(q, k, v, scale=1.0)
    q, k, v, _ = inputs(1, 4, 2, 1, 5, 8, torch.float32)
    with pytest.raises(InvalidArgumentError, match="must match"):
        attend(q, k, v[..., :4], scale=1.0)
    with pytest.raises(InvalidArgumentError, match="sinks"):
        attend(q, k, v, scale=1.0, sinks=torch.zeros(3))
    with pytest.raises(InvalidArgumentError, match="mask"):
        attend(q, k, v, scale=1.0, mask=torch.zeros(1, 1, 1, 5, dtype=torch.int64))
    assert attend(q[:0], k[:0], v[:0], scale=1.0).shape == (0, 1, 4, 8)
