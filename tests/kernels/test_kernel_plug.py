"""The formats and families say how the CPU kernels compute a layer (no method switch): every quantized
checkpoint the kernels can read, read in its stored bytes, gives what torch computes from the decoded weights;
families and formats the kernels do not have say so (torch computes them)."""

from __future__ import annotations

import pytest
import torch

import moe_patch
from moe_patch.dispatch.core import dispatch_combine
from moe_patch.families.kernel import ExpertKernel, layer_spec, meta_entry
from moe_patch.formats import materialize
from moe_patch.offload import OffloadOptions, get_offload_handle
from tests.helpers.formats import ALL_CASES, save_case

#: what the kernels read of each tiny checkpoint: the format kind, or None (torch computes it, and why)
EXPECTED = {
    # the tiny FP8 checkpoints' blocks (8 or 16 columns) are below the kernels' 32: torch decodes them
    "deepseek_v3-fp8": None,
    "qwen3_moe-fp8-ragged": None,
    "minimax_m2-fp8-ue8m0": None,
    "gpt_oss-mxfp4": "mxfp4",
    "qwen3_moe-int4": "int4",
    "mixtral-ct-fp8": "fp8",
    "qwen3_moe-metal": None,  # MLX affine: no kernel entry
    "llama4-fused": None,  # bf16 experts held [in, out]: the kernels read [out, in] bytes only
    "dbrx-flat": None,  # split w1/v1/w2: the family keeps torch
    "qwen3_moe-fp8-block32": "fp8",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("plug")
    return {name: save_case(name, root) for name in ALL_CASES}


def _entries(handle, layer):
    """Every expert of ``layer`` as the caches hold it (stored bytes for quantized checkpoints)."""
    engine = handle.engine
    return [engine.source.read_into(layer.index, e) for e in range(layer.num_experts)]


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_stored_experts_through_the_kernel_match_torch_on_the_decoded_weights(name, checkpoints, kernel_status):
    model = moe_patch.load_model(
        checkpoints[name],
        dtype=torch.float32,
        options=OffloadOptions(expert_cache=None, device_format="stored", prefetch=False),
    )
    handle = get_offload_handle(model)
    try:
        layer = handle.engine.layers[0]
        entries = _entries(handle, layer)
        maths = layer.family.kernel_maths(layer.experts)
        spec = layer_spec(maths, layer.num_experts, meta_entry(entries[0]))
        if EXPECTED[name] is None:
            assert isinstance(spec, str) and spec, spec
            with pytest.raises(moe_patch.kernels.KernelUnavailableError):
                ExpertKernel(maths, layer.num_experts, entries[0])
            return
        assert not isinstance(spec, str), spec
        assert spec.gate_up.kind == EXPECTED[name] and spec.down.kind == EXPECTED[name]
        # gate and up stored as two tensors (per-expert keys): read through two pointers, no copy
        assert spec.gate_up.split == (name in ("qwen3_moe-fp8-block32", "qwen3_moe-int4", "mixtral-ct-fp8"))
        kernel = ExpertKernel(maths, layer.num_experts, meta_entry(entries[0]))
        for e, entry in enumerate(entries):
            kernel.attach(e, entry)
        gen = torch.Generator().manual_seed(0)
        T, H, E, k = 5, spec.hidden, layer.num_experts, layer.top_k
        x = torch.randn(T, H, generator=gen)
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=gen)
        got = kernel.forward(x, idx, w)
        want = dispatch_combine(
            x,
            idx,
            w,
            E,
            lambda e, rows: layer.compute_expert(e, rows, {n: materialize(t) for n, t in entries[e].items()}),
        )
        assert kernel.calls == 1 and kernel.kernel.last_variant is not None
        # fp32 activations: the fp32 kernels within 1e-5 of torch on the same decoded weights
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
        kernel.detach(0)
        assert not kernel.attached(0)
        alone = torch.zeros(T, H)
        kernel.forward(x, idx, w, alone)
        keep = idx != 0
        want0 = dispatch_combine(
            x,
            torch.where(keep, idx, torch.full_like(idx, E)),
            w,
            E,
            lambda e, rows: layer.compute_expert(e, rows, {n: materialize(t) for n, t in entries[e].items()}),
        )
        assert ((alone - want0).abs().max() / want0.abs().max()).item() < 1e-5
    finally:
        handle.detach(restore_weights=False)


def test_resident_decorated_experts_map_to_the_kernels_default_gate_and_gpt_oss():
    from moe_patch.families.fused import decorated_kernel_maths
    from moe_patch.testing.tiny import tiny_model

    qwen, _ = tiny_model("qwen3_moe")
    experts = next(m for m in qwen.modules() if type(m).__name__.endswith("Experts"))
    maths = decorated_kernel_maths(experts)
    assert maths is not None and maths.activation == "silu" and maths.glu_layout == "halves"
    oss, _ = tiny_model("gpt_oss")
    experts = next(m for m in oss.modules() if type(m).__name__ == "GptOssExperts")
    maths = decorated_kernel_maths(experts)
    assert maths.activation == "gpt_oss" and maths.glu_layout == "interleaved"
    assert maths.gate_up_bias == "gate_up_proj_bias" and maths.limit == float(experts.limit)
