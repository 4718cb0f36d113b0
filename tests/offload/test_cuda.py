"""The CUDA paths, on a GPU: patched dispatch and offloaded generation against the Hugging Face forward.

Skipped where no GPU is present (CI has none); run on a GPU machine with ``pytest tests/offload/test_cuda.py``.
References run on the same GPU in fp32 with TF32 off, so the comparison is of the algorithm, not of
CPU vs GPU rounding.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import moe_patch
from moe_patch import patch_model, unpatch_model
from moe_patch.offload import OffloadOptions, get_offload_handle
from moe_patch.testing.compare import rel_diff
from moe_patch.testing.legacy import legacy_moe_model
from moe_patch.testing.tiny import main_output, tiny_model
from tests.helpers.offload import (
    FAMILIES,
    expert_bytes,
    greedy,
    load_reference,
    model_class,
    non_expert_bytes,
    prompts,
    save_families,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = "cuda"
NEW = 64


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# -- patched dispatch ----------------------------------------------------------------------------
PATCH_FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "gpt_oss",
    "llama4",
    "dbrx",
    "jetmoe",
    "legacy-mixtral",
]


def _build(name: str, dtype: torch.dtype):
    if name.startswith("legacy-"):
        model = legacy_moe_model(name.split("-", 1)[1], seed=0).to(dtype)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        inputs = {"input_ids": ids}
    else:
        model, inputs = tiny_model(name, dtype=dtype, seed=0)
    return model.to(CUDA), {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _logits(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs)).float()


@pytest.mark.parametrize("name", PATCH_FAMILIES)
def test_patched_fp32_on_cuda_matches_the_reference_and_generates_the_same_tokens(name):
    model, inputs = _build(name, torch.float32)
    ref = _logits(model, inputs)
    kw = {"use_cache": False} if name.startswith("legacy-") else {}
    ids = inputs["input_ids"][:1]
    with torch.no_grad():
        ref_tokens = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, **kw)
    report = patch_model(model)
    assert report.patched and not report.skipped, str(report)
    assert rel_diff(_logits(model, inputs), ref) < 1e-5
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, **kw)
    assert torch.equal(out, ref_tokens)
    assert unpatch_model(model)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "legacy-mixtral"])
def test_patched_bf16_on_cuda_is_within_the_documented_tolerance(name):
    model, inputs = _build(name, torch.bfloat16)
    ref = _logits(model, inputs)
    patch_model(model)
    assert rel_diff(_logits(model, inputs), ref) < 2e-2


def test_nan_router_weights_raise_on_cuda():
    model, inputs = _build("qwen3_moe", torch.float32)
    patch_model(model)
    gate = model.model.layers[0].mlp.gate
    with torch.no_grad():
        gate.weight[0, 0] = float("nan")
    with pytest.raises(moe_patch.RoutingError):
        _logits(model, inputs)


# -- offloading ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_families(tmp_path_factory.mktemp("cuda_ckpts"))


@pytest.fixture(scope="module")
def references(checkpoints):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for fam, path in checkpoints.items():
        ref = load_reference(fam, path).to(CUDA)
        out[fam] = {b: greedy(ref, prompts(b).to(CUDA), NEW) for b in (1, 4)}
        del ref
    torch.backends.cuda.matmul.allow_tf32 = old
    return out


def _load(family, checkpoints, **kw):
    kw.setdefault("dtype", torch.float32)
    return moe_patch.load_model(checkpoints[family], device=CUDA, model_class=model_class(family), **kw)


@pytest.mark.parametrize("host", ["no_host_cache", "host_cache"])
@pytest.mark.parametrize("budget", ["one_expert", "everything"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_offloaded_generation_on_cuda_matches_the_resident_model(family, batch, budget, host, checkpoints, references):
    one = expert_bytes(family)
    limit = one if budget == "one_expert" else None
    host_cache = 4 * one if host == "host_cache" else 0
    model = _load(family, checkpoints, expert_cache=limit, host_cache=host_cache)
    handle = get_offload_handle(model)
    try:
        assert next(model.parameters()).device.type == "cuda"
        out = greedy(model, prompts(batch).to(CUDA), NEW)
        assert torch.equal(out, references[family][batch])
        if limit is not None:
            assert handle.engine.dev.peak <= limit and handle.engine.dev.evictions > 0
        if host_cache:
            assert handle.engine.pool is None or handle.engine.pool.pinned
            assert handle.engine.host.peak <= host_cache
    finally:
        handle.detach(restore_weights=False)


@pytest.mark.parametrize("budget", ["two_experts", "everything"])
def test_odd_expert_widths_offloaded_on_cuda_fall_back_where_the_grouped_kernel_cannot_run(budget, tmp_path):
    """An expert width of 37 fp32 values breaks the grouped kernel's 16-byte strides: the engine's slot
    GEMM takes the checked path, as the resident patched model does, and generates the same tokens."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.offload import config_for

    cfg = config_for("qwen3_moe")
    cfg.moe_intermediate_size = 37
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp_path / "odd")
    ref = (
        AutoModelForCausalLM.from_pretrained(tmp_path / "odd", dtype=torch.float32, experts_implementation="eager")
        .to(CUDA)
        .eval()
    )
    expected = greedy(ref, prompts(2).to(CUDA), NEW)
    one = 3 * 37 * cfg.hidden_size * 4
    model = moe_patch.load_model(
        tmp_path / "odd", device=CUDA, dtype=torch.float32, expert_cache=2 * one if budget == "two_experts" else None
    )
    try:
        assert torch.equal(greedy(model, prompts(2).to(CUDA), NEW), expected)
    finally:
        get_offload_handle(model).detach(restore_weights=False)


def test_device_memory_holds_non_expert_weights_plus_the_budget(checkpoints):
    one = expert_bytes("qwen3_moe")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = _load("qwen3_moe", checkpoints, expert_cache=3 * one, host_cache=0)
    handle = get_offload_handle(model)
    greedy(model, prompts(4).to(CUDA), 16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # the experts never take more than their budget; activations and the KV cache of a tiny model are < 1 MiB
    assert peak <= non_expert_bytes(model) + 3 * one + 2**20, peak
    handle.detach(restore_weights=False)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_cpu_compute_of_host_resident_misses_on_cuda_gives_the_same_tokens(family, checkpoints, references):
    one = expert_bytes(family)
    model = _load(
        family,
        checkpoints,
        options=OffloadOptions(device=CUDA, expert_cache=one, host_cache=None, cpu_compute="always"),
    )
    handle = get_offload_handle(model)
    out = greedy(model, prompts(1).to(CUDA), NEW)
    assert torch.equal(out, references[family][1])
    assert sum(layer.cpu_computed for layer in handle.stats.layers) > 0
    handle.detach(restore_weights=False)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_experts_on_cuda_generate_and_report_their_error(kind, checkpoints):
    one = expert_bytes("qwen3_moe")
    model = _load("qwen3_moe", checkpoints, expert_cache=one // 2, host_cache=2 * one, quantize_experts=kind)
    handle = get_offload_handle(model)
    out = greedy(model, prompts(2).to(CUDA), 32)
    assert out.shape == (2, 6 + 32)
    err = handle.quantization_error(prompts(2, length=12).to(CUDA))
    assert err["max_rel"] < (0.2 if kind == "nf4" else 0.05), err
    assert err["top1_agreement"] > 0.8, err
    handle.detach(restore_weights=False)


def test_offloading_a_model_already_on_the_gpu_frees_its_experts_and_detach_restores_them(checkpoints, references):
    model = load_reference("mixtral", checkpoints["mixtral"]).to(CUDA)
    before = torch.cuda.memory_allocated()
    patch_model(model, offload=OffloadOptions(device=CUDA, expert_cache=expert_bytes("mixtral"), host_cache="1MiB"))
    assert torch.cuda.memory_allocated() < before  # experts left the GPU
    assert torch.equal(greedy(model, prompts(4).to(CUDA), NEW), references["mixtral"][4])
    get_offload_handle(model).detach()
    assert next(model.model.layers[0].mlp.experts.parameters()).device.type == "cuda"
    assert torch.equal(greedy(model, prompts(4).to(CUDA), NEW), references["mixtral"][4])


@torch.no_grad()
def test_five_hundred_decode_steps_under_eviction_with_prefetch_on_cuda(checkpoints):
    path = checkpoints["qwen3_moe"]
    ref = load_reference("qwen3_moe", path).to(CUDA)
    one = expert_bytes("qwen3_moe")
    model = _load("qwen3_moe", checkpoints, expert_cache=3 * one, host_cache=4 * one, prefetch=True)
    handle = get_offload_handle(model)
    gen = torch.Generator().manual_seed(1)
    ids = prompts(1).to(CUDA)
    ref_cache, off_cache = DynamicCache(config=ref.config), DynamicCache(config=model.config)
    ref_logits = ref(ids, past_key_values=ref_cache, use_cache=True).logits[:, -1]
    off_logits = model(ids, past_key_values=off_cache, use_cache=True).logits[:, -1]
    for step in range(500):
        assert torch.allclose(off_logits, ref_logits, rtol=1e-5, atol=1e-5), f"step {step} diverged"
        nxt = ref_logits.argmax(-1, keepdim=True) if step % 2 else torch.randint(0, 128, (1, 1), generator=gen).to(CUDA)
        ref_logits = ref(nxt, past_key_values=ref_cache, use_cache=True).logits[:, -1]
        off_logits = model(nxt, past_key_values=off_cache, use_cache=True).logits[:, -1]
    st = handle.stats
    assert handle.engine.dev.evictions > 500 and handle.engine.dev.peak <= 3 * one
    assert st.prefetch_issued > 0
    assert st.bytes_read["decode"]["host"] > 0  # the pinned host tier served misses
    handle.detach(restore_weights=False)


def test_calibration_measures_the_gpu_link():
    from moe_patch.offload.costmodel import calibrate

    bw = calibrate(CUDA)
    assert bw.h2d > 1e9 and bw.device_flops > 1e11 and bw.dram > 1e9


# -- quantized and fused-on-disk checkpoints ---------------------------------------------------------
FORMAT_CASES = [
    "deepseek_v3-fp8",
    "qwen3_moe-fp8-ragged",
    "gpt_oss-mxfp4",
    "qwen3_moe-int4",
    "llama4-fused",
    "dbrx-flat",
]


@pytest.fixture(scope="module")
def format_checkpoints(tmp_path_factory):
    from tests.helpers.formats import save_case

    root = tmp_path_factory.mktemp("cuda_formats")
    return {name: save_case(name, root) for name in FORMAT_CASES}


@pytest.mark.parametrize("device_format", ["stored", "dequantized"])
@pytest.mark.parametrize("name", FORMAT_CASES)
def test_quantized_checkpoints_on_cuda_match_the_stock_dequantized_load(name, device_format, format_checkpoints):
    """Stored bytes cross PCIe and are decoded on the GPU (after the copy, or at each use)."""
    from tests.helpers.formats import load_oracle

    path = format_checkpoints[name]
    oracle = load_oracle(name, path).to(CUDA)
    want = greedy(oracle, prompts(4).to(CUDA), NEW)
    model = moe_patch.load_model(
        path,
        device=CUDA,
        dtype=torch.float32,
        options=OffloadOptions(device=CUDA, expert_cache="64KiB", host_cache=None, device_format=device_format),
    )
    handle = get_offload_handle(model)
    try:
        assert torch.equal(greedy(model, prompts(4).to(CUDA), NEW), want)
        engine = handle.engine
        if engine.stored:
            stored = engine.source.nbytes(0, 0)
            # host entries and what crossed PCIe are the stored bytes
            assert all(engine.host._entries[k].nbytes == stored for k in engine.host.keys())
            if device_format == "stored":
                assert all(engine.dev.nbytes(k) == stored for k in engine.dev.keys())
            else:
                assert all(engine.dev.nbytes(k) == engine.layers[0].expert_bytes for k in engine.dev.keys())
    finally:
        handle.detach(restore_weights=False)
