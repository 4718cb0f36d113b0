"""Exact upcycling: every supported source -> target pair and granularity G in {1, 2, 4}.

Specification: the upcycled checkpoint loads with plain AutoModelForCausalLM (no remote code, no
missing or unexpected keys), stores experts in the per-expert on-disk layout real Hub checkpoints
use, keeps every config detail, and computes the dense model's function: fp32 logits within 1e-5
relative and the same 32 greedy tokens.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from converters import REPORT_NAME, UpcycleConfig, compare_models, upcycle
from tests.helpers.upcycle import (
    EXPECTED_TARGET,
    FAMILIES,
    FFN,
    HIDDEN,
    load,
    make_dense,
)

EXPERT_KEY = {
    "MixtralForCausalLM": "model.layers.{l}.block_sparse_moe.experts.{e}.{p}.weight",
    "Qwen2MoeForCausalLM": "model.layers.{l}.mlp.experts.{e}.{p}.weight",
    "Qwen3MoeForCausalLM": "model.layers.{l}.mlp.experts.{e}.{p}.weight",
    "FlexOlmoForCausalLM": "model.layers.{l}.mlp.experts.{e}.{p}.weight",
}
PROJ = {"MixtralForCausalLM": ("w1", "w3", "w2")}


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {f: make_dense(root / f, f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def dense_models(dense_dirs):
    return {f: load(p) for f, p in dense_dirs.items()}


@pytest.mark.parametrize("granularity", [1, 2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_model_is_exact_and_loads_as_stock_class(family, granularity, dense_dirs, dense_models, tmp_path):
    out = tmp_path / "moe"
    num_experts, top_k = 4 * granularity, 2 * granularity
    report = upcycle(
        dense_dirs[family], out, UpcycleConfig(num_experts=num_experts, top_k=top_k, granularity=granularity)
    )

    from transformers import AutoModelForCausalLM

    moe, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    moe.eval()
    arch = EXPECTED_TARGET[family]
    assert type(moe).__name__ == arch
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys

    dense = dense_models[family]
    check = compare_models(dense, moe, vocab_size=dense.config.vocab_size, seed=123, new_tokens=32)
    assert check.rel_diff <= 1e-5, check
    assert check.greedy_tokens_compared == 2 * 32
    assert check.greedy_token_agreement == 1.0, check

    # the report written next to the weights agrees and carries the contract keys
    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved["recipe"]["exact"] is True and saved["verification"]["passed"] is True
    assert saved["verification"]["rel_diff"] <= 1e-5
    assert saved["target"] == {"model_type": moe.config.model_type, "architecture": arch}
    assert saved["source"]["model_type"] == family
    assert saved["total_params"] == moe.num_parameters() == report.total_params
    expert_params = 3 * HIDDEN * FFN // granularity
    assert saved["active_params"] == saved["total_params"] - 2 * (num_experts - top_k) * expert_params

    # per-expert tensors in the checkpoint's own layout (what vLLM/SGLang and Hub checkpoints use)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    names = PROJ.get(arch, ("gate_proj", "up_proj", "down_proj"))
    for e in range(num_experts):
        for p in names:
            assert EXPERT_KEY[arch].format(l=1, e=e, p=p) in keys
    assert not any(".mlp.gate_up_proj" in k or "experts.gate_up_proj" in k for k in keys)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_details_carry_over(family, dense_dirs, tmp_path):
    out = tmp_path / "moe"
    upcycle(dense_dirs[family], out, UpcycleConfig(num_experts=4, top_k=2, verify=False))
    src = json.loads((dense_dirs[family] / "config.json").read_text())
    dst = json.loads((out / "config.json").read_text())
    for key in (
        "rope_parameters",
        "tie_word_embeddings",
        "rms_norm_eps",
        "num_key_value_heads",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "vocab_size",
        "max_position_embeddings",
        "hidden_act",
    ):
        assert dst.get(key) == src.get(key), key
    if "head_dim" in src:
        assert dst["head_dim"] == src["head_dim"]
    if family == "mistral":
        assert dst["sliding_window"] == src["sliding_window"] == 16
    assert (out / "generation_config.json").read_bytes() == (dense_dirs[family] / "generation_config.json").read_bytes()


def test_output_loads_without_remote_code_and_generates(dense_dirs, tmp_path):
    # the same call a user makes, with trust_remote_code left at its default
    out = tmp_path / "moe"
    upcycle(dense_dirs["qwen3"], out, UpcycleConfig(num_experts=8, top_k=2, verify=False))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 17]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("family, max_window_layers", [("qwen2", 1), ("qwen3", 0)])
def test_sliding_window_layers_carry_over_exactly(family, max_window_layers, tmp_path):
    from tests.helpers.upcycle import source_config

    cfg = source_config(family, use_sliding_window=True, sliding_window=12, max_window_layers=max_window_layers)
    src = make_dense(tmp_path / "dense", family, config=cfg)
    assert "sliding_attention" in cfg.layer_types
    report = upcycle(src, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2, granularity=2))
    assert report.verification["rel_diff"] <= 1e-5 and report.verification["greedy_token_agreement"] == 1.0
    moe_cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert moe_cfg["sliding_window"] == 12


def test_qwen3_with_mixed_attention_types_is_refused(tmp_path):
    from moe_patch.errors import MoEConfigError
    from tests.helpers.upcycle import source_config

    cfg = source_config("qwen3", use_sliding_window=True, sliding_window=12, max_window_layers=1)
    src = make_dense(tmp_path / "dense", "qwen3", config=cfg)
    with pytest.raises(MoEConfigError, match="layer_types mixes"):
        upcycle(src, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2))


def test_bf16_checkpoint_stays_exact_with_power_of_two_scales(tmp_path):
    from transformers import AutoModelForCausalLM

    fp32 = make_dense(tmp_path / "fp32", "qwen2", seed=4)
    AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    exact = upcycle(tmp_path / "bf16", tmp_path / "g4", UpcycleConfig(num_experts=8, top_k=4, granularity=4))
    assert exact.recipe["dtype"] == "bfloat16" and exact.recipe["exact"]
    assert exact.verification["rel_diff"] <= 1e-5 and exact.verification["greedy_token_agreement"] == 1.0
    # 3 routed slices per copy: down_proj x 3 rounds in bf16, and the report says so
    rounded = upcycle(
        tmp_path / "bf16", tmp_path / "g4s1", UpcycleConfig(num_experts=6, top_k=3, granularity=4, shared_experts=1)
    )
    assert not rounded.recipe["exact"] and "alpha is not a power of two" in rounded.recipe["inexact_reasons"][0]


def test_downcasting_the_output_is_reported_as_rounding(tmp_path, dense_dirs):
    report = upcycle(dense_dirs["llama"], tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2, dtype="bfloat16"))
    assert report.recipe["dtype"] == "bfloat16" and not report.recipe["exact"]
    assert "rounded from torch.float32 to torch.bfloat16" in report.recipe["inexact_reasons"][0]
    assert report.verification["rel_diff"] < 0.05  # measured divergence is small but reported
