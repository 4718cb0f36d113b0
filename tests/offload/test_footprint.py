"""What a run needs besides the experts, and the expert-cache budget `auto` chooses from it.

The KV cache is checked against the cache transformers itself fills in a real forward of tiny random models
(grouped-query attention, MLA latents, sliding windows, hybrid linear attention, two attentions per layer);
the budget rule against its terms; the calibration of the offload cost model against a second load.
"""

from __future__ import annotations

import pytest
import torch

from moe_patch.errors import BudgetError
from moe_patch.offload.auto_budget import DEFAULT_CONTEXT_CAP, auto_expert_cache, default_context
from moe_patch.offload.footprint import (
    HEADROOM,
    activation_bytes,
    kv_cache_elements,
    kv_elements_estimate,
    measured_kv_elements,
)
from moe_patch.testing.tiny import tiny_model


def filled_cache_elements(model, tokens: int) -> int:
    """Elements of the keys and values transformers' cache holds after a real forward over ``tokens`` tokens."""
    ids = torch.randint(3, 100, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    # a linear-attention layer keeps a fixed-size state instead of keys and values
    kept = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    return sum(t.numel() for t in kept if isinstance(t, torch.Tensor))


# mixtral: grouped-query; deepseek_v3: MLA latent + rotary key; gpt_oss: sliding and full layers (window 64 in the
# tiny config, so 100 tokens overflow it); qwen3_next: linear-attention layers keep no per-token cache;
# longcat_flash: two attentions per layer; mimo_v2_flash: sliding layers with their own head counts
MEASURED = ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_next", "longcat_flash", "mimo_v2_flash"]


@pytest.mark.parametrize("family", MEASURED)
@pytest.mark.parametrize("tokens", [8, 100])
def test_the_kv_cache_measured_on_meta_is_the_one_transformers_fills(family, tokens):
    model, _ = tiny_model(family)
    assert measured_kv_elements(model.config, tokens) == filled_cache_elements(model, tokens) > 0
    assert kv_cache_elements(model.config, tokens) == (filled_cache_elements(model, tokens), True)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_next", "longcat_flash"])
@pytest.mark.parametrize("tokens", [8, 100])
def test_the_estimate_from_the_config_agrees_for_the_common_attentions(family, tokens):
    model, _ = tiny_model(family)
    assert kv_elements_estimate(model.config, tokens) == filled_cache_elements(model, tokens)


def test_a_model_that_cannot_run_on_meta_gets_the_estimate(monkeypatch):
    from moe_patch.offload import footprint

    model, _ = tiny_model("mixtral")

    def fails(*args, **kwargs):
        raise NotImplementedError("nonzero on meta")

    monkeypatch.setattr(footprint, "measured_kv_elements", fails)
    assert kv_cache_elements(model.config, 8) == (filled_cache_elements(model, 8), False)


def test_activations_grow_with_the_tokens_and_count_the_last_logits():
    config = tiny_model("mixtral")[0].config
    one, two = activation_bytes(config, 100, 4), activation_bytes(config, 200, 4)
    logits = 4 * 4 * config.vocab_size
    assert two - logits == 2 * (one - logits) > 0
    assert activation_bytes(config, 100, 2) < one


# -- the budget `auto` chooses ----------------------------------------------------------------------------------
def offload_layers(model):
    from moe_patch.offload.layers import find_offload_layers

    return find_offload_layers(model)


def test_the_automatic_budget_is_free_memory_less_every_term():
    model, _ = tiny_model("qwen3_moe")
    free = 900_000  # leaves room for some of the 16 experts (24 KiB each), not all
    on_meta = model.to("meta")  # nothing loaded yet, as in load_model: every non-expert weight is still to come
    chosen = auto_expert_cache(
        on_meta, offload_layers(on_meta), torch.device("cpu"), host_cache=None, context_tokens=64, free=free
    )
    non_expert = sum(t.numel() * t.element_size() for n, t in on_meta.named_parameters() if ".experts." not in n)
    non_expert += sum(t.numel() * t.element_size() for t in on_meta.buffers())
    assert chosen.non_expert == non_expert
    assert chosen.kv_cache == filled_cache_elements(tiny_model("qwen3_moe")[0], 64) * 4
    assert chosen.activations == activation_bytes(model.config, 64, 4)
    assert chosen.expert_cache == free - int(free * HEADROOM) - non_expert - chosen.kv_cache - chosen.activations
    assert max(layer.expert_bytes for layer in offload_layers(model)) < chosen.expert_cache < chosen.all_experts
    assert "expert cache auto: " in str(chosen) and "KV cache for 64 tokens" in str(chosen)


def test_weights_already_on_the_device_are_not_counted_twice_and_the_cap_is_every_expert():
    model, _ = tiny_model("qwen3_moe")  # loaded on the CPU: the CPU's free memory already holds them
    layers = offload_layers(model)
    chosen = auto_expert_cache(model, layers, torch.device("cpu"), host_cache=None, context_tokens=16, free=2**40)
    assert chosen.non_expert == 0
    assert chosen.expert_cache == chosen.all_experts == sum(x.num_experts * x.expert_bytes for x in layers)
    assert "every routed expert fits" in str(chosen)


def test_a_machine_without_room_for_one_expert_is_told_what_to_do_in_its_own_words():
    model, _ = tiny_model("qwen3_moe")
    with pytest.raises(BudgetError) as caught:
        auto_expert_cache(
            model, offload_layers(model), torch.device("cpu"), host_cache=2**20, context_tokens=16, free=2**20
        )
    assert "expert_cache auto: nothing is left" in str(caught.value) and "quantize_experts='nf4'" in str(caught.value)
    assert "--ctx-size" in caught.value.cli_message and "--quantize nf4" in caught.value.cli_message
    assert "host cache 1.00 MiB" in str(caught.value)  # on a CPU both tiers are the same RAM


def test_the_default_context_is_the_models_capped():
    config = tiny_model("qwen3_moe")[0].config
    config.max_position_embeddings = 131072
    assert default_context(config) == DEFAULT_CONTEXT_CAP == 4096
    config.max_position_embeddings = 512
    assert default_context(config) == 512


def test_load_model_with_an_automatic_budget_generates_as_resident(tmp_path, caplog):
    import logging

    import moe_patch
    from tests.helpers.offload import build, load_reference

    path = tmp_path / "ckpt"
    build("qwen3_moe").save_pretrained(path)
    ids = torch.tensor([[5, 6, 7]])
    ref = load_reference("qwen3_moe", path).generate(ids, max_new_tokens=6, do_sample=False)
    with caplog.at_level(logging.INFO, logger="moe_patch"):
        model = moe_patch.load_model(path, dtype=torch.float32, expert_cache="auto")
    assert any(r.getMessage().startswith("expert cache auto: ") for r in caplog.records)
    handle = moe_patch.offload.get_offload_handle(model)
    assert handle.options.expert_cache > 0
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), ref)


# -- calibration: once per machine ------------------------------------------------------------------------------
def test_the_cost_models_calibration_is_measured_once_per_machine(monkeypatch):
    from moe_patch.dispatch.calibration import CALIBRATIONS
    from moe_patch.offload import costmodel

    measured = []
    real = costmodel.measure_bandwidths

    def counting(device, dtype, size_mb):
        measured.append((device, dtype))
        return real(device, dtype, 8)  # small: the figures are not the point here

    monkeypatch.setattr(costmodel, "measure_bandwidths", counting)
    costmodel.calibrate.cache_clear()
    first = costmodel.calibrate("cpu", torch.float16)
    costmodel.calibrate.cache_clear()  # a new process: nothing in memory but the machine's file
    CALIBRATIONS.clear()
    second = costmodel.calibrate("cpu", torch.float16)
    costmodel.calibrate.cache_clear()
    assert len(measured) == 1 and second == first and first.dram > 0 and first.cpu_gemv > 0
