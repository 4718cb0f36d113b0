"""A few of transformers' common model checks, run on patched tiny models against stock twins.

transformers tests every model with generation, save/load, training and implementation-switch checks
(tests/test_modeling_common.py, tests/generation/test_utils.py); these are the ones a patch can break,
written here from transformers' public API. Each family stands for one adapter: decorated experts
(plain and transposed with biases), DBRX's 2-D stacks, JetMoE, Switch Transformers' routed list and a
repacked ModuleList model.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from moe_patch import patch_model
from moe_patch.testing.compare import rel_diff
from moe_patch.testing.tiny import main_output
from tests.patch.patch_helpers import build, logits, undeclared_shared_storage

FAMILIES = ["mixtral", "gpt_oss", "dbrx", "jetmoe", "switch_transformers", "legacy-mixtral"]


def twins(name: str):
    """A stock model, a patched one with the same weights, and example inputs."""
    stock, inputs = build(name)
    patched, _ = build(name)
    report = patch_model(patched)
    assert report.patched and not report.skipped, str(report)
    return stock, patched, inputs


def _generate(model, inputs, **kwargs):
    torch.manual_seed(0)
    if type(model).__name__.startswith("Legacy"):
        kwargs["use_cache"] = False  # its layers keep no KV cache
    if model.config.is_encoder_decoder:
        kwargs["decoder_start_token_id"] = 0
    with torch.no_grad():
        return model.generate(
            input_ids=inputs["input_ids"][:1], max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **kwargs
        )


GENERATION_MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0),
    "beam search": dict(do_sample=False, num_beams=2),
}


@pytest.mark.parametrize("mode", GENERATION_MODES)
@pytest.mark.parametrize("name", FAMILIES)
def test_generation_matches_stock(name, mode):
    stock, patched, inputs = twins(name)
    assert torch.equal(
        _generate(patched, inputs, **GENERATION_MODES[mode]), _generate(stock, inputs, **GENERATION_MODES[mode])
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_round_trip_with_stock_transformers(name, tmp_path):
    stock, patched, inputs = twins(name)
    stock.save_pretrained(tmp_path / "stock")
    patched.save_pretrained(tmp_path / "patched")
    # The same tensors under the same names, and a config with no trace of moe-patch.
    saved = safetensors.torch.load_file(tmp_path / "patched" / "model.safetensors")
    reference = safetensors.torch.load_file(tmp_path / "stock" / "model.safetensors")
    assert saved.keys() == reference.keys() and all(torch.equal(saved[k], reference[k]) for k in saved)
    assert (tmp_path / "patched" / "config.json").read_text() == (tmp_path / "stock" / "config.json").read_text()

    reloaded, info = type(stock).from_pretrained(tmp_path / "patched", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    from_stock = type(stock).from_pretrained(tmp_path / "stock")
    assert torch.equal(logits(reloaded.eval(), inputs), logits(from_stock.eval(), inputs))
    patch_model(reloaded)
    assert rel_diff(logits(reloaded, inputs), logits(patched, inputs)) < 1e-6


@pytest.mark.parametrize("name", FAMILIES)
def test_tied_weights_are_only_those_declared(name):
    _, patched, _ = twins(name)
    assert undeclared_shared_storage(patched) == []


def _train_step(model, inputs, checkpointing: bool):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(0)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    model.eval()
    return loss.detach(), logits(model, inputs)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient checkpointing"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_training_step_matches_stock(name, checkpointing):
    stock, patched, inputs = twins(name)
    if checkpointing and not stock.supports_gradient_checkpointing:
        pytest.skip(f"{type(stock).__name__} does not support gradient checkpointing")
    ref_loss, ref_after = _train_step(stock, inputs, checkpointing)
    loss, after = _train_step(patched, inputs, checkpointing)
    assert rel_diff(loss, ref_loss) < 1e-5
    assert rel_diff(after, ref_after) < 1e-4  # the step moved the weights the same way


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("name", FAMILIES)
def test_set_experts_implementation_matches_stock(name, implementation):
    stock, patched, inputs = twins(name)
    try:
        stock.set_experts_implementation(implementation)
    except ValueError as refused:  # grouped_mm on a model without decorated experts
        with pytest.raises(ValueError, match=str(refused)):
            patched.set_experts_implementation(implementation)
        return
    patched.set_experts_implementation(implementation)
    assert patched.get_experts_implementation() == stock.get_experts_implementation()
    with torch.no_grad():
        out, ref = main_output(patched(**inputs)), main_output(stock(**inputs))
    if stock._can_set_experts_implementation() and implementation != "grouped_mm":
        assert torch.equal(out, ref)  # transformers' own implementation runs on both
    else:
        assert rel_diff(out, ref) < 1e-5
