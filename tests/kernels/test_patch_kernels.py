"""``patch_model`` on a CPU computes resident decorated experts through the CPU kernels where this machine's
calibration measures them faster than transformers' grouped_mm: the kernel reads views of the module's own
parameters (kept on the module, dropped on unpatch, rebuilt when the weights move), never under autograd; fp32
within 1e-5 of the Hugging Face forward, bf16 within the bf16 tolerance, the same greedy tokens."""

from __future__ import annotations

import pytest
import torch

from moe_patch import inspect_model, patch_model, unpatch_model
from moe_patch.families import kernel as family_kernel
from moe_patch.testing.compare import rel_diff
from tests.patch.patch_helpers import build, copied, logits

ATTR = "_moe_patch_cache_expert_kernel"
#: decorated families with transformers' default gate (silu); gpt-oss's resident experts are held [in, out],
#: which the kernels do not read (its checkpoints' MXFP4 bytes are [out, in]: the offload engine reads those)
FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"]


def _experts(model):
    return [model.get_submodule(b.experts_path) for b in inspect_model(model).blocks]


def _greedy(model, ids, n=32):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.fixture
def kernel_measured_faster(monkeypatch, kernel_status):
    monkeypatch.setattr(family_kernel, "kernel_wins", lambda dtype, rows: True)


def _kernel_calls(model) -> int:
    cached = [m.__dict__.get(ATTR) for m in _experts(model)]
    return sum(c.value.calls for c in cached if c is not None and c.value is not None)


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_through_the_kernel_matches_the_reference(name, kernel_measured_faster):
    model, inputs = build(name)
    ref = logits(model, inputs)
    ref_tokens = _greedy(model, inputs["input_ids"][:1])
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-5
    assert torch.equal(_greedy(model, inputs["input_ids"][:1]), ref_tokens)
    assert _kernel_calls(model) > 0  # the kernel path ran, not the fallback
    assert unpatch_model(model)
    assert all(ATTR not in m.__dict__ for m in _experts(model))  # unpatch drops the kernels
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_bf16_through_the_kernel_is_within_the_bf16_tolerance(name, kernel_measured_faster):
    model, inputs = build(name, dtype=torch.bfloat16)
    ref = logits(model, inputs)
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 2e-2
    assert _kernel_calls(model) > 0


def test_transposed_resident_experts_keep_torch(kernel_measured_faster):
    from moe_patch.families.kernel import module_kernel

    model, inputs = build("gpt_oss")
    ref = logits(model, inputs)
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-5
    assert all(module_kernel(m) is None for m in _experts(model)) and _kernel_calls(model) == 0


def test_not_measured_faster_or_under_autograd_keeps_torch(monkeypatch, kernel_status):
    model, inputs = build("qwen3_moe")
    ref = logits(model, inputs)
    patch_model(model)
    monkeypatch.setattr(family_kernel, "kernel_wins", lambda dtype, rows: False)
    assert rel_diff(logits(model, inputs), ref) < 1e-5 and _kernel_calls(model) == 0
    monkeypatch.setattr(family_kernel, "kernel_wins", lambda dtype, rows: True)
    out = model(**inputs).logits  # grad enabled, parameters require grad: autograd needs torch's path
    out.sum().backward()
    assert _kernel_calls(model) == 0
    assert next(p for p in model.parameters() if p.grad is not None) is not None


def test_the_kernel_is_rebuilt_when_the_weights_move(kernel_measured_faster):
    model, inputs = build("qwen3_moe")
    patch_model(model)
    logits(model, inputs)
    experts = _experts(model)[0]
    first = experts.__dict__[ATTR].value
    with torch.no_grad():
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj * 2)
    logits(model, inputs)
    assert experts.__dict__[ATTR].value is not first


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_after_a_forward_builds_its_own_kernel(how, kernel_measured_faster):
    """The kernel kept on a module points into that module's weights (ctypes pointers, which do not pickle): a
    copy of a patched model that has run carries an empty cache and derives its own kernel from its own weights."""
    model, inputs = build("qwen3_moe", dtype=torch.bfloat16)
    patch_model(model)
    ref = logits(model, inputs)
    twin = copied(model, how)
    assert torch.equal(logits(twin, inputs), ref)
    assert _kernel_calls(twin) > 0
    mine, theirs = _experts(model)[0].__dict__[ATTR].value, _experts(twin)[0].__dict__[ATTR].value
    assert mine is not theirs


def test_weights_the_kernel_cannot_read_in_place_keep_torch(kernel_measured_faster):
    model, inputs = build("qwen3_moe")
    ref = logits(model, inputs)
    patch_model(model)
    for experts in _experts(model):  # same values, a layout with no contiguous rows
        w = experts.gate_up_proj.detach()
        experts.gate_up_proj = torch.nn.Parameter(w.transpose(1, 2).contiguous().transpose(1, 2))
    assert rel_diff(logits(model, inputs), ref) < 1e-5 and _kernel_calls(model) == 0


def test_kernels_off_gives_the_same_tokens(monkeypatch, kernel_measured_faster):
    from moe_patch.kernels import KERNELS

    model, inputs = build("qwen3_moe")
    patch_model(model)
    on = _greedy(model, inputs["input_ids"][:1])
    unpatch_model(model)
    monkeypatch.setenv("MOE_PATCH_KERNELS", "0")
    KERNELS.reset()
    try:
        patch_model(model)
        assert torch.equal(_greedy(model, inputs["input_ids"][:1]), on) and _kernel_calls(model) == 0
    finally:
        monkeypatch.undo()
        KERNELS.reset()
