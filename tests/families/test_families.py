"""Every MoE family of the installed transformers is detected, patched exactly, and unpatched.

The families come from transformers' own sources (``discover_moe_families``), not from a list kept
here, so a family added by a later transformers release is tested as soon as it is installed: it
passes, or it is listed with a reason in ``moe_patch.families.UNSUPPORTED``, or the suite fails.
Each test builds a tiny random-weight model of the family (hidden 64, 2 layers, 8 experts, top-2).
"""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch

import moe_patch
from moe_patch.families import UNSUPPORTED
from moe_patch.testing.discover import classify_source, moe_family_info
from moe_patch.testing.tiny import discover_moe_families, main_output, tiny_config, tiny_model

FAMILIES = discover_moe_families()

# Config fields that give a block's number of routed experts and its top-k, in any family.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "top_k_experts",
    "moe_k",
    "moe_top_k",
    "moe_topk",
    "top_k",
)

# fp32 exactness bound of the patched forward: max |patched - reference| / max |reference|.
REL_TOL = 1e-5


# --------------------------------------------------------------------------------------- discovery


def test_discovery_reads_transformers_families():
    # Decorated (experts interface) and undecorated (adapter) families are both found ...
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= set(FAMILIES)
    assert {"llama4", "dbrx", "jetmoe", "switch_transformers", "nllb-moe"} <= set(FAMILIES)
    # ... and dense families are not, even where their code mentions experts (Bamba's
    # ``num_experts = 1``, Pi0's "action expert").
    assert not {"llama", "mistral", "qwen3", "bamba", "pi0"} & set(FAMILIES)
    assert moe_family_info("mixtral").decorated and not moe_family_info("dbrx").decorated


def test_discovery_finds_an_undecorated_family_by_structure():
    # A future family without transformers' experts decorator, 4.x style: a ModuleList of MLPs.
    source = textwrap.dedent("""
        class NewMoeBlock(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
                self.experts = nn.ModuleList([NewMLP(config) for _ in range(config.num_local_experts)])
    """)
    assert classify_source(source) == (True, False)
    # Stacked expert weights without a router attribute name are found from their shape.
    stacked = textwrap.dedent("""
        class Stacked(nn.Module):
            def __init__(self, config):
                self.w = nn.Parameter(torch.empty(config.moe_num_experts, 8, 8))
    """)
    assert classify_source(stacked) == (True, False)
    dense = textwrap.dedent("""
        class Dense(nn.Module):
            def __init__(self, config):
                self.expert_hidden_size = config.hidden_size
                self.proj = nn.Linear(self.expert_hidden_size, 4)
    """)
    assert classify_source(dense) == (False, False)


def test_every_family_is_tested_or_listed_unsupported_with_a_reason():
    stale = sorted(set(UNSUPPORTED) - set(FAMILIES))
    assert not stale, f"UNSUPPORTED lists families transformers no longer defines: {stale}"
    for model_type, reason in UNSUPPORTED.items():
        assert isinstance(reason, str) and len(reason.split()) >= 3, f"{model_type}: give a written reason"
    # Everything else runs test_patch_is_exact_and_reversible below (parametrized from discovery).
    assert set(_covered()) | set(UNSUPPORTED) == set(FAMILIES)


def _covered() -> list[str]:
    return [f for f in FAMILIES if f not in UNSUPPORTED]


def _family_params():
    return [
        pytest.param(f, marks=pytest.mark.skip(reason=f"unsupported: {UNSUPPORTED[f]}")) if f in UNSUPPORTED else f
        for f in FAMILIES
    ]


# ------------------------------------------------------------------------------------------ patch


def _config_values(config, names: tuple[str, ...]) -> set[int]:
    """Values of ``names`` anywhere in the config (sub-configs and per-layer overrides included)."""
    found: set[int] = set()

    def walk(d):
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            elif key in names and isinstance(value, int) and not isinstance(value, bool) and value > 0:
                found.add(value)

    walk(config.to_dict())
    return found


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main_output(model(**inputs)).detach().clone()


def _snapshot(model) -> dict[str, tuple]:
    """What patching may change: module objects, per-instance forwards and attributes, and the
    experts implementation each config selects."""
    state = {}
    for name, module in model.named_modules():
        state[name] = (
            id(module),
            type(module),
            module.__dict__.get("forward"),
            frozenset(k for k in module.__dict__ if not k.startswith("_")),
        )
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "__dict__"):
            state[name + "#experts_implementation"] = (config.__dict__.get("_experts_implementation_internal"),)
    return state


def _forward_recording(model, inputs, paths: list[str]) -> tuple[torch.Tensor, set[str]]:
    """The forward output and which of the modules at ``paths`` it ran."""
    modules = dict(model.named_modules())
    ran: set[str] = set()
    hooks = [modules[p].register_forward_hook(lambda *_, p=p: ran.add(p)) for p in paths]
    try:
        return _forward(model, inputs), ran
    finally:
        for hook in hooks:
            hook.remove()


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("model_type", _family_params())
def test_patch_is_exact_and_reversible(model_type):
    model, inputs = tiny_model(model_type)
    report = moe_patch.inspect_model(model)
    assert report.blocks, f"{model_type}: no MoE block detected"
    counts = _config_values(model.config, EXPERT_COUNT_FIELDS)
    top_ks = _config_values(model.config, TOP_K_FIELDS)
    for block in report.blocks:
        assert block.num_experts in counts, (block.path, block.num_experts, counts)
        if top_ks:  # Switch / NLLB-MoE route top-1/top-2 by construction, with no config field
            assert block.top_k in top_ks, (block.path, block.top_k, top_ks)

    # The reference forward must really run MoE blocks (text-only inputs skip e.g. vision experts).
    reference, ran = _forward_recording(model, inputs, [b.path for b in report.blocks])
    assert reference.isfinite().all()
    assert ran, f"{model_type}: the example inputs run none of the detected MoE blocks"

    before = _snapshot(model)
    patch = moe_patch.patch_model(model)
    assert patch.patched and not patch.skipped, str(patch)
    patched = _forward(model, inputs)
    rel = _rel_diff(patched, reference)
    assert rel <= REL_TOL, f"{model_type}: patched logits differ by {rel:.3g} relative"

    after_first = _snapshot(model)
    again = moe_patch.patch_model(model)
    assert again.already_patched
    assert _snapshot(model) == after_first, "patching twice changed the model"

    assert moe_patch.unpatch_model(model)
    assert _snapshot(model) == before, "unpatch_model did not restore the original modules/forwards"
    assert torch.equal(_forward(model, inputs), reference)


# ------------------------------------------------------------------------------------ tiny models


def test_tiny_config_honours_overrides_and_stays_small():
    config = tiny_config("qwen3_moe", num_experts=4)
    assert config.num_experts == 4 and config.num_hidden_layers == 2 and config.vocab_size <= 128
    composite = tiny_config("qwen3_vl_moe", text_config={"num_experts": 6})
    assert composite.text_config.num_experts == 6 and composite.text_config.hidden_size <= 64


def test_tiny_model_is_seeded_and_routes_non_degenerately():
    a, inputs = tiny_model("qwen3_moe", seed=3)
    b, _ = tiny_model("qwen3_moe", seed=3)
    c, _ = tiny_model("qwen3_moe", seed=4)
    assert torch.equal(_forward(a, inputs), _forward(b, inputs))
    assert not torch.equal(_forward(a, inputs), _forward(c, inputs))
    # Routers are random, not zero-initialised: tokens do not all tie or all pick the same experts.
    with torch.no_grad():
        router_logits = a(**inputs, output_router_logits=True).router_logits[0]
    assert (router_logits.std(dim=-1) > 1e-3).all()
    chosen = {tuple(sorted(row)) for row in router_logits.topk(2, dim=-1).indices.tolist()}
    assert len(chosen) > 1


def test_tiny_model_in_bf16_keeps_the_family_fp32_modules():
    # Inkling2 routes in fp32 (`_keep_in_fp32_modules_strict`), as from_pretrained(dtype=bf16) keeps it.
    model, inputs = tiny_model("inkling2", dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert any(d == torch.float32 and "mlp.gate.weight" in n for n, d in dtypes.items())
    assert any(d == torch.bfloat16 and "experts" in n for n, d in dtypes.items())
    assert _forward(model, inputs).isfinite().all()
