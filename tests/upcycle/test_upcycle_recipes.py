"""Upcycling recipes: expert layout rules, shared experts, interleaved MoE layers, router inits,
drop-upcycling and noise, Branch-Train-MiX and LoRA experts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from converters import REPORT_NAME, ExpertLayout, UpcycleConfig, compare_models, upcycle
from converters.recipes import (
    drop_mask,
    expand_router,
    principal_directions,
    spherical_kmeans,
)
from moe_patch.errors import CheckpointError, MoEConfigError
from tests.helpers.upcycle import (
    FFN,
    HIDDEN,
    load,
    make_dense,
    make_lora,
    perturbed_copy,
    save_word_tokenizer,
)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    return {f: make_dense(root / f, f, seed=7) for f in ("llama", "qwen2", "qwen3")}


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_exact(dense_dir, out):
    dense, moe = load(dense_dir), load(out)
    check = compare_models(dense, moe, vocab_size=dense.config.vocab_size, seed=5, new_tokens=32)
    assert check.rel_diff <= 1e-5 and check.greedy_token_agreement == 1.0, check


# -- layout rules (pure) --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=2, top_k=4), "--num-experts 2 < --top-k 4"),
        (dict(num_experts=6, top_k=3, granularity=5), "does not divide the FFN width"),
        (dict(num_experts=8, top_k=2, granularity=2, shared_slices=2), "must be smaller than --granularity"),
        (dict(num_experts=6, top_k=4, granularity=4, shared_slices=1), "multiples of the routed slices"),
    ],
)
def test_layout_refuses_inconsistent_numbers(kwargs, message):
    with pytest.raises(MoEConfigError, match=message):
        ExpertLayout(ffn_width=64, **kwargs)


def test_layout_maps_experts_to_copies_and_slices():
    lay = ExpertLayout(ffn_width=64, num_experts=9, top_k=3, granularity=4, shared_slices=1)
    assert (lay.copies, lay.routed_slices, lay.slice_width, lay.shared_width, lay.alpha) == (3, 3, 16, 16, 3.0)
    assert [lay.expert(e) for e in range(4)] == [(0, 1), (0, 2), (0, 3), (1, 1)]
    assert lay.neurons(3) == slice(48, 64)


def test_renormalised_topk_over_virtual_groups_always_picks_whole_groups():
    rows = expand_router(torch.randn(6, 16), routed_slices=4)
    probs = torch.softmax(torch.randn(500, 16) @ rows.T, dim=-1)
    _, idx = torch.topk(probs, 8, dim=-1)
    groups = (idx // 4).sort(dim=-1).values
    assert torch.equal(groups[:, ::4], groups[:, 3::4])  # every chosen group appears 4 times


# -- shared experts and interleaved layers --------------------------------------------------------
def test_qwen2_shared_expert_is_exact(src, tmp_path):
    out = tmp_path / "moe"
    upcycle(src["qwen2"], out, UpcycleConfig(num_experts=6, top_k=3, granularity=4, shared_experts=1))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["shared_expert_intermediate_size"] == FFN // 4 and cfg["moe_intermediate_size"] == FFN // 4
    t = tensors(out)
    assert torch.count_nonzero(t["model.layers.0.mlp.shared_expert_gate.weight"]) == 0
    assert_exact(src["qwen2"], out)


def test_shared_experts_refused_for_targets_without_one(src, tmp_path):
    with pytest.raises(MoEConfigError, match="has no shared expert"):
        upcycle(src["llama"], tmp_path / "o", UpcycleConfig(num_experts=3, top_k=3, granularity=2, shared_experts=1))


@pytest.mark.parametrize("family, spec, step, mlp_only", [("qwen2", "every-2", 2, []), ("qwen3", "0", 1, [1])])
def test_interleaved_moe_layers_use_the_targets_config_fields(src, tmp_path, family, spec, step, mlp_only):
    out = tmp_path / "moe"
    report = upcycle(src[family], out, UpcycleConfig(num_experts=4, top_k=2, granularity=2, moe_layers=spec))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["decoder_sparse_step"], cfg["mlp_only_layers"]) == (step, mlp_only)
    moe_layer = report.recipe["moe_layers"][0]
    dense_layer = 1 - moe_layer
    keys = tensors(out)
    assert f"model.layers.{dense_layer}.mlp.up_proj.weight" in keys
    assert f"model.layers.{moe_layer}.mlp.gate.weight" in keys
    assert_exact(src[family], out)


def test_interleaving_refused_where_the_target_cannot_express_it(src, tmp_path):
    with pytest.raises(MoEConfigError, match="makes every layer an MoE layer"):
        upcycle(src["llama"], tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2, moe_layers="every-2"))


# -- router init ----------------------------------------------------------------------------------
def test_zero_router_is_exact_for_plain_copies(src, tmp_path):
    out = tmp_path / "moe"
    report = upcycle(src["llama"], out, UpcycleConfig(num_experts=4, top_k=2, router_init="zero"))
    assert report.recipe["exact"] and report.verification["passed"]
    assert torch.count_nonzero(tensors(out)["model.layers.0.block_sparse_moe.gate.weight"]) == 0


def test_zero_router_with_fine_grained_experts_is_reported_inexact(src, tmp_path):
    report = upcycle(
        src["llama"], tmp_path / "o", UpcycleConfig(num_experts=8, top_k=2, granularity=2, router_init="zero")
    )
    assert report.recipe["exact"] is False
    assert any("ties" in r for r in report.recipe["inexact_reasons"])


@pytest.mark.parametrize("kind", ["kmeans", "pca"])
def test_data_router_init_from_text_with_the_sources_tokenizer(src, tmp_path, kind):
    words = [f"w{i}" for i in range(60)]
    dense = tmp_path / "dense"
    make_dense(dense, "qwen3", seed=3)
    save_word_tokenizer(dense, words)
    text = tmp_path / "calib.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(60, (600,), generator=g)))
    out = tmp_path / "moe"
    report = upcycle(
        dense, out, UpcycleConfig(num_experts=8, top_k=4, granularity=2, router_init=kind, calibration=text)
    )
    router = tensors(out)["model.layers.1.mlp.gate.weight"]
    assert torch.equal(router[0::2], router[1::2])  # experts of one copy share a row (virtual group)
    assert len({tuple(r.tolist()) for r in router[0::2]}) == 4  # copies are told apart
    assert report.recipe["exact"] and report.verification["passed"]
    assert (out / "tokenizer.json").is_file()  # tokenizer files travel with the model


def test_data_router_init_from_token_ids(src, tmp_path):
    ids = tmp_path / "calib.ids"
    ids.write_text(
        " ".join(str(i) for i in torch.randint(4, 128, (300,), generator=torch.Generator().manual_seed(1)).tolist())
    )
    report = upcycle(
        src["llama"], tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2, router_init="kmeans", calibration=ids)
    )
    assert report.verification["passed"]


def test_text_calibration_without_a_tokenizer_is_refused(src, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("hello world, some words")
    with pytest.raises(MoEConfigError, match="no tokenizer files"):
        upcycle(
            src["llama"], tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2, router_init="pca", calibration=text)
        )
    assert not (tmp_path / "o").exists()


def test_kmeans_and_pca_find_the_structure_of_their_input():
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    x = torch.cat([c + 0.05 * torch.randn(50, 8, generator=g) for c in centres])
    found = spherical_kmeans(x, 3, seed=0)
    assert (found @ centres.T).max(dim=0).values.min() > 0.99
    line = torch.randn(200, 1, generator=g) * torch.tensor([[3.0, 0, 0, 0]]) + 0.01 * torch.randn(200, 4, generator=g)
    assert abs(float(principal_directions(line, 1)[0, 0])) > 0.99


# -- diversity recipes (not exact by design) -----------------------------------------------------
def test_drop_upcycling_reinitialises_the_requested_fraction_per_expert(src, tmp_path):
    out = tmp_path / "moe"
    report = upcycle(src["llama"], out, UpcycleConfig(num_experts=4, top_k=2, drop_ratio=0.5, seed=3))
    assert report.recipe["exact"] is False and "drop-upcycling" in report.recipe["inexact_reasons"][0]
    v = report.verification
    assert v is not None and v["rel_diff"] > 1e-3 and not v["passed"]  # measured divergence is reported
    dense, moe = tensors(src["llama"]), tensors(out)
    w = dense["model.layers.0.mlp.up_proj.weight"]
    changed = []
    for e in range(4):
        up = moe[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"]
        rows = (up != w).any(dim=1)
        assert int(rows.sum()) == FFN // 2
        fresh = up[rows]
        assert abs(float(fresh.std()) - float(w.std())) < 0.3 * float(w.std())
        changed.append(rows)
    assert not torch.equal(changed[0], changed[1])  # a fresh subset per expert
    assert torch.equal(changed[0], drop_mask(FFN, 0.5, 3, 0, 0))


def test_noise_is_seeded_and_relative_to_the_weights(src, tmp_path):
    a = upcycle(src["llama"], tmp_path / "a", UpcycleConfig(num_experts=2, top_k=1, noise=0.01, seed=1))
    upcycle(src["llama"], tmp_path / "b", UpcycleConfig(num_experts=2, top_k=1, noise=0.01, seed=1, verify=False))
    assert a.recipe["exact"] is False and 0 < a.verification["rel_diff"] < 0.1
    ta, tb, dense = tensors(tmp_path / "a"), tensors(tmp_path / "b"), tensors(src["llama"])
    k = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert torch.equal(ta[k], tb[k])
    w = dense["model.layers.0.mlp.gate_proj.weight"]
    assert float((ta[k] - w).std()) == pytest.approx(0.01 * float(w.std()), rel=0.2)


# -- Branch-Train-MiX and LoRA experts -----------------------------------------------------------
def test_branch_train_mix_takes_each_experts_ffn_from_its_model_and_averages_the_rest(src, tmp_path):
    a = src["llama"]
    b = perturbed_copy(a, tmp_path / "ft-b", seed=1)
    out = tmp_path / "btx"
    report = upcycle(a, out, UpcycleConfig(top_k=1, experts_from=[a, b]))
    assert report.recipe["num_experts"] == 2 and report.recipe["exact"] is False
    ta, tb, moe = tensors(a), tensors(b), tensors(out)
    assert torch.equal(
        moe["model.layers.1.block_sparse_moe.experts.0.w2.weight"], ta["model.layers.1.mlp.down_proj.weight"]
    )
    assert torch.equal(
        moe["model.layers.1.block_sparse_moe.experts.1.w1.weight"], tb["model.layers.1.mlp.gate_proj.weight"]
    )
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(moe[q], (ta[q] + tb[q]) / 2)


def test_branch_train_mix_of_identical_models_is_the_dense_model(src, tmp_path):
    report = upcycle(src["llama"], tmp_path / "o", UpcycleConfig(top_k=2, experts_from=[src["llama"]] * 3))
    assert report.verification["rel_diff"] <= 1e-5


def test_branch_train_mix_refuses_a_model_of_another_base(src, tmp_path):
    with pytest.raises(CheckpointError, match="differs from SRC"):
        upcycle(src["llama"], tmp_path / "o", UpcycleConfig(top_k=1, experts_from=[src["llama"], src["qwen3"]]))


def test_lora_adapters_become_experts(src, tmp_path):
    base = src["llama"]
    a1 = make_lora(base, tmp_path / "a1", seed=1)
    a2 = make_lora(base, tmp_path / "a2", seed=2, targets=("gate_proj", "up_proj", "down_proj", "q_proj"))
    out = tmp_path / "moe"
    report = upcycle(base, out, UpcycleConfig(top_k=2, granularity=2, lora_experts=[a1, a2]))
    assert report.recipe["num_experts"] == 4 and report.recipe["exact"] is False
    dense, moe = tensors(base), tensors(out)
    with safe_open(a2 / "adapter_model.safetensors", "pt") as f:
        A = f.get_tensor("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight")
        B = f.get_tensor("base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight")
        qa = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        qb = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    merged = dense["model.layers.0.mlp.gate_proj.weight"] + (B @ A) * 2.0  # lora_alpha / r = 8 / 4
    # expert 3 = copy 1 (adapter a2), second slice of neurons
    torch.testing.assert_close(moe["model.layers.0.block_sparse_moe.experts.3.w1.weight"], merged[FFN // 2 :])
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(moe[q], dense[q] + (qb @ qa) * 2.0 / 2)  # attention updates are averaged


def test_lora_adapter_for_another_base_is_refused(src, tmp_path):
    from tests.helpers.upcycle import source_config

    cfg = source_config("llama")
    cfg.intermediate_size = 96  # same family, another base: its FFN is wider
    other_base = make_dense(tmp_path / "other-base", "llama", config=cfg)
    other = make_lora(other_base, tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="another base model"):
        upcycle(src["llama"], tmp_path / "o", UpcycleConfig(top_k=1, lora_experts=[other]))
    assert not (tmp_path / "o").exists()


def test_report_records_the_recipe(src, tmp_path):
    out = tmp_path / "moe"
    upcycle(src["qwen2"], out, UpcycleConfig(num_experts=6, top_k=3, granularity=4, shared_experts=1, seed=9))
    r = json.loads((out / REPORT_NAME).read_text())["recipe"]
    for key in (
        "num_experts",
        "top_k",
        "granularity",
        "shared_experts",
        "moe_layers",
        "router_init",
        "drop_ratio",
        "noise",
        "seed",
        "exact",
    ):
        assert key in r
    assert (r["num_experts"], r["top_k"], r["granularity"], r["shared_experts"], r["seed"]) == (6, 3, 4, 1, 9)
    assert r["expert_intermediate_size"] == FFN // 4 and HIDDEN == 32
