"""The offload engine on a CPU computes its experts through the CPU kernels, straight from what the slots hold
(quantized checkpoints in their stored bytes), and generates exactly what stock transformers' dequantized fp32
load of the same checkpoint does; with the kernels off (``MOE_PATCH_KERNELS=0``) the torch path gives the same
tokens. Cached experts are one kernel call per layer; misses a second call once loaded."""

from __future__ import annotations

import pytest
import torch

import moe_patch
from moe_patch.kernels import KERNELS
from moe_patch.offload import OffloadOptions, get_offload_handle
from tests.helpers.formats import load_oracle, save_case
from tests.helpers.offload import build, greedy, prompts

NEW = 64
#: checkpoints whose experts the kernels read: MXFP4 (gpt-oss: interleaved, biases, clamped SwiGLU), int4
#: groups and FP8 per channel (compressed-tensors), FP8 32-blocks with gate/up stored apart, and a bf16
#: checkpoint loaded in fp32 (the kernels read the bf16 bytes); deepseek's 8-column FP8 blocks are refused in
#: their stored form, so the slots keep them decoded (fp32), which the kernels read
CASES = [
    "gpt_oss-mxfp4",
    "qwen3_moe-int4",
    "mixtral-ct-fp8",
    "qwen3_moe-fp8-block32",
    "qwen3_moe-fp8-block32-bf16",
    "deepseek_v3-fp8",
]
DECODED = {"deepseek_v3-fp8", "qwen3_moe-fp8-block32-bf16"}  # slots hold the model dtype


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-kernels")
    out = {name: save_case(name, root) for name in CASES if not name.endswith("-bf16")}
    out["qwen3_moe-fp8-block32-bf16"] = root / "qwen3_moe-fp8-block32-bf16"  # written by save_case
    return out


@pytest.fixture(scope="module")
def oracles(checkpoints):
    torch.set_num_threads(1)
    out = {}
    for name, path in checkpoints.items():
        model = (
            load_oracle(name.removesuffix("-bf16"), path) if not name.endswith("-bf16") else moe_patch_free_load(path)
        )
        out[name] = {"logits": model(prompts(4)).logits, **{b: greedy(model, prompts(b), NEW) for b in (1, 4)}}
    return out


def moe_patch_free_load(path):
    """Stock transformers' fp32 load of a plain bf16 checkpoint."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch, kernel_status):
    """Each test runs with the kernels on, then off (MOE_PATCH_KERNELS=0: the torch path)."""
    if request.param == "torch":
        monkeypatch.setenv("MOE_PATCH_KERNELS", "0")
        KERNELS.reset()
    yield request.param
    monkeypatch.undo()
    KERNELS.reset()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch, budget", [(1, "everything"), (4, "everything"), (4, "three_experts")])
@pytest.mark.parametrize("name", CASES)
def test_engine_through_the_kernels_generates_the_stock_dequantized_tokens(
    name, batch, budget, path, checkpoints, oracles, monkeypatch
):
    ckpt = checkpoints[name]
    limit = None
    if budget == "three_experts":
        probe = moe_patch.load_model(ckpt, dtype=torch.float32)
        engine = get_offload_handle(probe).engine
        limit = 3 * max(engine.source.nbytes(layer.index, 0) for layer in engine.layers)
        get_offload_handle(probe).detach(restore_weights=False)
    model = moe_patch.load_model(ckpt, dtype=torch.float32, options=OffloadOptions(expert_cache=limit))
    handle = get_offload_handle(model)
    engine = handle.engine
    miss_calls = []
    original = engine._kernel_misses
    monkeypatch.setattr(engine, "_kernel_misses", lambda *a, **k: miss_calls.append(1) or original(*a, **k))
    try:
        if batch == 4:
            assert _rel(model(prompts(4)).logits, oracles[name]["logits"]) < 1e-5
        assert torch.equal(greedy(model, prompts(batch), NEW), oracles[name][batch])
        # deepseek's blocks in a small budget stay stored (capacity), in a format the kernels refuse: torch
        served = path == "kernels" and not (name == "deepseek_v3-fp8" and budget == "three_experts")
        assert (engine.kernels.calls > 0) == served
        if served and name not in DECODED:
            assert handle.stats.device_format == "stored"  # no decoded copies: the kernels read the stored bytes
        if budget == "three_experts":
            assert handle.stats.bytes_read["decode"]["disk"] > 0
            assert bool(miss_calls) == served  # misses computed by the kernel once loaded
    finally:
        handle.detach(restore_weights=False)


def test_bf16_slots_are_computed_in_place_by_the_kernels_not_upcast(tmp_path, kernel_status):
    """A bf16 model on a CPU: the kernels compute the bf16 slots (bf16 dot products, fp32 sums), so the
    slots keep bf16 (no fp32 copies, whatever torch's GEMV rates are)."""
    import transformers

    path = tmp_path / "bf16"
    build("qwen3_moe").to(torch.bfloat16).save_pretrained(path)
    resident = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = moe_patch.load_model(path, dtype=torch.bfloat16)
    handle = get_offload_handle(model)
    try:
        with torch.no_grad():
            got, want = model(prompts(2)).logits.float(), resident(prompts(2)).logits.float()
        assert _rel(got, want) < 2e-2  # bf16 tolerance
        assert handle.stats.compute_dtype is None and handle.engine.dev.groups[0].slab.dtype == torch.bfloat16
        assert handle.engine.kernels.calls > 0
    finally:
        handle.detach(restore_weights=False)


def _decoded_slots_with_host_copies(ckpt):
    """Decoded device slots for 4 experts, the stored copies in the host tier, misses computed from there."""
    probe = moe_patch.load_model(ckpt, dtype=torch.float32)
    decoded = max(layer.expert_bytes for layer in get_offload_handle(probe).engine.layers)
    get_offload_handle(probe).detach(restore_weights=False)
    return moe_patch.load_model(
        ckpt,
        dtype=torch.float32,
        options=OffloadOptions(
            expert_cache=4 * decoded, host_cache=None, cpu_compute="always", device_format="dequantized"
        ),
    )


@pytest.mark.parametrize("name", ["gpt_oss-mxfp4", "qwen3_moe-int4", "qwen3_moe-fp8-block32"])
def test_host_resident_misses_computed_on_the_cpu_read_the_stored_bytes(name, path, checkpoints, oracles):
    """Decoded device slots with the stored copies in the host tier (what a GPU run has): misses the CPU
    computes from host RAM go through the kernel, straight from the stored bytes."""
    model = _decoded_slots_with_host_copies(checkpoints[name])
    handle = get_offload_handle(model)
    try:
        assert torch.equal(greedy(model, prompts(4), NEW), oracles[name][4])
        assert sum(layer.cpu_computed for layer in handle.stats.layers) > 0
        assert (handle.engine.kernels.host_calls > 0) == (path == "kernels")
    finally:
        handle.detach(restore_weights=False)


def test_cost_model_reads_the_kernels_measured_rate_for_host_tier_experts(checkpoints, monkeypatch, kernel_status):
    """Whether a miss is computed on the CPU (GPU runs) weighs the kernel's measured streaming rate for the
    stored format, not torch's GEMV of decoded weights (the decision itself is taken on GPU runs only: not run here)."""
    from moe_patch.kernels import crossover

    asked = []
    monkeypatch.setattr(crossover.CROSSOVERS, "stream_rate", lambda kind, compute: asked.append(kind) or 12.5e9)
    model = moe_patch.load_model(
        checkpoints["gpt_oss-mxfp4"], dtype=torch.float32, options=OffloadOptions(host_cache=None, cpu_compute="always")
    )
    handle = get_offload_handle(model)
    try:
        engine = handle.engine
        bw = engine._cpu_bandwidths(0)
        assert bw.cpu_gemv == 12.5e9 and asked == ["mxfp4"]
        assert bw.dram == engine.plan.bandwidths.dram  # the rest is the plan's
    finally:
        handle.detach(restore_weights=False)


@pytest.mark.parametrize("name", ["gpt_oss-mxfp4", "qwen3_moe-int4"])
def test_host_resident_misses_overlap_the_hits_on_a_cpu_thread(name, checkpoints, oracles, monkeypatch, kernel_status):
    """What a GPU run does (the overlap is on where the device is asynchronous), forced on a CPU run: misses
    in host RAM start on a CPU thread through the kernel before the hits are computed, and are added after."""
    model = _decoded_slots_with_host_copies(checkpoints[name])
    handle = get_offload_handle(model)
    engine = handle.engine
    assert not engine.overlap_cpu  # a CPU run: the CPU would only compete with itself
    engine.overlap_cpu = True
    jobs = []
    original = engine._launch_cpu
    monkeypatch.setattr(engine, "_launch_cpu", lambda *a, **k: (lambda j: jobs.append(j) or j)(original(*a, **k)))
    try:
        assert torch.equal(greedy(model, prompts(4), NEW), oracles[name][4])
        assert any(j is not None for j in jobs) and engine.kernels.host_calls > 0
        assert all(entry.pins == 0 for entry in engine.host._entries.values())  # every job released its entries
    finally:
        handle.detach(restore_weights=False)
