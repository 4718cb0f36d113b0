"""Decode-step attention through the kernels as an implementation registered with transformers
(:mod:`moe_patch.cpu_attention`): a model given it generates the stock tokens (gpt-oss: eager with sinks and sliding
windows; Qwen3: sdpa), with left padding, and its logits stay within fp32 sums; the calls it does not take (prefill
past the row limit, autograd, requested attention weights) go to transformers' own function; restore puts the
implementation back; the CPU offload engine installs it and detach removes it; a saved config never names it."""

from __future__ import annotations

import json

import pytest
import torch

from moe_patch import cpu_attention
from moe_patch.cpu_attention import CpuAttentionStats, install_cpu_attention, restore_cpu_attention
from moe_patch.offload import get_offload_handle, load_model
from moe_patch.testing.compare import rel_diff
from tests.helpers.offload import build, greedy, load_reference, save_tiny

FAMILIES = {"gpt_oss": "eager", "qwen3_moe": "sdpa"}


def _model(family: str) -> torch.nn.Module:
    model = build(family)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "sinks"):  # zeros at init: make the sink column matter
                m.sinks.normal_(0, 2.0)
    return model


def _padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


def _generate(model, ids, mask, n=24):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_transformers_attention(family, kernel_status):
    model = _model(family)
    assert model.config._attn_implementation == FAMILIES[family]
    ids, mask = _padded_prompts()
    want = _generate(model, ids, mask)
    with torch.no_grad():
        want_logits = model(ids, attention_mask=mask).logits
    assert install_cpu_attention(model)
    assert model.config._attn_implementation == cpu_attention.IMPLEMENTATIONS[FAMILIES[family]]
    before = CpuAttentionStats.calls
    assert torch.equal(_generate(model, ids, mask), want)
    assert CpuAttentionStats.calls - before >= 24 * model.config.num_hidden_layers  # the kernel ran every step
    with torch.no_grad():
        got_logits = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_diff(got_logits[keep], want_logits[keep]) <= 1e-5
    restore_cpu_attention(model)
    assert model.config._attn_implementation == FAMILIES[family]


def test_bf16_logits_stay_within_bf16_rounding(kernel_status):
    model = _model("gpt_oss").to(torch.bfloat16)
    ids, mask = _padded_prompts()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.float()
        install_cpu_attention(model)
        got = model(ids, attention_mask=mask).logits.float()
    assert rel_diff(got[mask.bool()], want[mask.bool()]) <= 0.03


def test_calls_the_kernel_does_not_take_go_to_transformers(kernel_status):
    model = _model("qwen3_moe")
    ids = torch.randint(3, 60, (1, cpu_attention.MAX_QUERY_ROWS + 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    install_cpu_attention(model)
    before = CpuAttentionStats.calls
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)  # a long prefill: transformers' sdpa, bit for bit
    assert CpuAttentionStats.calls == before
    short = ids[:, :4]
    model(short).logits.sum().backward()  # autograd: transformers' function (the kernel has no backward)
    assert CpuAttentionStats.calls == before
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_a_model_that_cannot_use_it_keeps_its_own(kernel_status, monkeypatch):
    model = _model("qwen3_moe")
    model.set_attn_implementation("eager")
    monkeypatch.setattr(cpu_attention, "_eager_of", lambda module: None)  # a family without an eager function
    assert not install_cpu_attention(model)
    assert model.config._attn_implementation == "eager"
    restore_cpu_attention(model)  # nothing to restore: a no-op
    assert model.config._attn_implementation == "eager"


def test_a_family_whose_attention_computes_something_else_keeps_its_own(kernel_status, monkeypatch):
    model = _model("qwen3_moe")
    model.set_attn_implementation("eager")
    eager = cpu_attention._eager_of(model.model.layers[0].self_attn)

    def tempered(module, query, key, value, attention_mask, scaling=None, **kwargs):  # reads the module itself
        return eager(module, query, key, value, attention_mask, scaling=0.5 * scaling, **kwargs)

    monkeypatch.setattr(cpu_attention, "_eager_of", lambda module: tempered)
    assert not install_cpu_attention(model)  # the self-check at install saw other numbers
    assert model.config._attn_implementation == "eager"


def test_calls_with_arguments_the_kernel_does_not_know_go_to_transformers(kernel_status):
    model = _model("gpt_oss")
    attn = model.model.layers[0].self_attn
    hq, hkv, d = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    q, k, v = torch.randn(1, hq, 1, d), torch.randn(1, hkv, 5, d), torch.randn(1, hkv, 5, d)
    mask = torch.zeros(1, 1, 1, 5)
    before = CpuAttentionStats.calls
    cpu_attention.eager_attention(attn, q, k, v, mask, scaling=0.3, s_aux=attn.sinks, position_bias=torch.zeros(1))
    assert CpuAttentionStats.calls == before
    cpu_attention.eager_attention(attn, q, k, v, mask, scaling=0.3, s_aux=attn.sinks, position_ids=None, use_cache=True)
    assert CpuAttentionStats.calls == before + 1


def test_the_cpu_offload_engine_installs_it_and_detach_removes_it(tmp_path, kernel_status):
    ckpt = save_tiny("gpt_oss", tmp_path / "ckpt")
    model = load_model(ckpt, expert_cache="1GiB", dtype=torch.float32)
    assert model.config._attn_implementation == "moe_patch_cpu_eager"
    ids = torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(2))
    reference = load_reference("gpt_oss", ckpt)
    before = CpuAttentionStats.calls
    assert torch.equal(greedy(model, ids, 16), greedy(reference, ids, 16))
    assert CpuAttentionStats.calls > before
    model.save_pretrained(tmp_path / "saved")
    assert "moe_patch" not in json.dumps(json.loads((tmp_path / "saved" / "config.json").read_text()))
    get_offload_handle(model).detach()
    assert model.config._attn_implementation == "eager"


def test_requested_attention_weights_come_from_transformers(kernel_status):
    model = _model("gpt_oss")
    install_cpu_attention(model)
    before = CpuAttentionStats.calls
    with torch.no_grad():
        out = model(torch.randint(3, 60, (1, 4)), output_attentions=True)
    assert out.attentions is not None and all(a is not None for a in out.attentions)  # eager's weights
    assert CpuAttentionStats.calls == before
