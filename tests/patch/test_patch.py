"""patch_model / unpatch_model: exact against the Hugging Face forward, reversible, idempotent,
generation-, training-, peft- and compile-safe; bad input fails loudly."""

from __future__ import annotations

import json

import pytest
import torch

import moe_patch
from moe_patch import MoEConfigError, RoutingError, inspect_model, patch_model, unpatch_model
from moe_patch.detect.config import validate_moe_config
from moe_patch.testing.compare import rel_diff
from moe_patch.testing.legacy import legacy_moe_model
from moe_patch.testing.tiny import main_output, tiny_model

# The families the other issues lean on, plus each adapter kind (the full family sweep is
# tests/families/test_families.py). "legacy-*" are ModuleList models defined in moe_patch.testing.legacy.
CORE = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
    "gpt_oss",
    "llama4",
    "dbrx",
    "jetmoe",
    "legacy-mixtral",
    "legacy-deepseek",
]


def build(name: str, dtype=torch.float32, seed: int = 0):
    if name.startswith("legacy-"):
        model = legacy_moe_model(name.split("-", 1)[1], seed=seed).to(dtype)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
        return model, {"input_ids": ids}
    return tiny_model(name, dtype=dtype, seed=seed)


def logits(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


def greedy(model, ids, n=32):
    kw = {"use_cache": False} if type(model).__name__.startswith("Legacy") else {}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("name", CORE)
def test_patched_fp32_logits_and_greedy_tokens_match_the_reference(name):
    model, inputs = build(name)
    ref = logits(model, inputs)
    ref_tokens = greedy(model, inputs["input_ids"][:1])
    report = patch_model(model)
    assert report.patched and not report.skipped, str(report)
    assert rel_diff(logits(model, inputs), ref) < 1e-5
    assert torch.equal(greedy(model, inputs["input_ids"][:1]), ref_tokens)
    assert unpatch_model(model)
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "gpt_oss", "legacy-mixtral"])
def test_patched_bf16_logits_are_within_documented_tolerance(name):
    """bf16 rounds each product differently when rows are grouped: 2e-2 relative (docs/architecture.md)."""
    model, inputs = build(name, dtype=torch.bfloat16)
    ref = logits(model, inputs)
    report = patch_model(model)
    assert report.patched and not report.skipped, str(report)
    assert rel_diff(logits(model, inputs), ref) < 2e-2


def test_patching_twice_is_a_no_op_and_unpatch_restores_the_original_forward():
    model, inputs = build("qwen2_moe")
    experts = model.get_submodule(inspect_model(model).blocks[0].experts_path)
    first = patch_model(model)
    assert experts.config._experts_implementation == "moe_patch"
    second = patch_model(model)
    assert second.already_patched and not first.already_patched and second.patched == first.patched
    assert experts.config._experts_implementation == "moe_patch"
    assert model.config._experts_implementation == "grouped_mm"  # the model's own config is not touched
    unpatch_model(model)
    assert experts.config is model.config
    assert not unpatch_model(model)  # nothing left to restore


def test_models_sharing_one_config_are_patched_independently():
    from transformers import MixtralForCausalLM

    from moe_patch.testing.tiny import tiny_config

    config = tiny_config("mixtral")
    a, b = MixtralForCausalLM(config), MixtralForCausalLM(config)
    patch_model(a)
    experts_b = b.get_submodule(inspect_model(b).blocks[0].experts_path)
    assert experts_b.config._experts_implementation == "grouped_mm"
    patch_model(b)
    unpatch_model(a)
    unpatch_model(b)
    for m in (a, b):
        assert all(e.config is config for e in m.modules() if hasattr(e, "has_gate"))


def test_instance_patches_leave_the_class_and_other_instances_alone():
    a, inputs = build("llama4")
    b, _ = build("llama4", seed=1)
    patch_model(a)
    block_a = a.get_submodule(inspect_model(a).blocks[0].path)
    block_b = b.get_submodule(inspect_model(b).blocks[0].path)
    assert "forward" in block_a.__dict__ and "forward" not in block_b.__dict__
    unpatch_model(a)
    assert "forward" not in block_a.__dict__


def test_patch_reaches_the_moe_patch_experts_forward(monkeypatch):
    """A patch that silently kept transformers' path would pass every exactness test: check the call."""
    from moe_patch import validation

    calls = []
    real = validation.check_routing
    monkeypatch.setattr(validation, "check_routing", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, inputs = build("mixtral")
    patch_model(model)
    logits(model, inputs)
    assert len(calls) == len(inspect_model(model).blocks)


@pytest.mark.parametrize("crossover,ours", [(1.0, True), (float("inf"), False)])
def test_decorated_experts_take_ours_only_where_it_is_measured_faster(monkeypatch, crossover, ours):
    """Never slower than stock: bf16 experts run moe-patch's fp32 path only where this machine's calibration
    says fp32 beats bf16 at that many rows per expert; otherwise the implementation the model had."""
    import transformers.integrations.moe as hf_moe

    from moe_patch.dispatch import calibration
    from moe_patch.dispatch import experts as experts_mod
    from moe_patch.families import kernel as family_kernel

    monkeypatch.setattr(calibration, "upcast_min_rows", lambda dtype: crossover)
    monkeypatch.setattr(family_kernel, "kernel_wins", lambda dtype, rows: False)  # the CPU kernels: test_patch_kernels
    ours_calls, stock_calls = [], []
    real_ours, real_stock = experts_mod.bank_dispatch, hf_moe.grouped_mm_experts_forward
    monkeypatch.setattr(experts_mod, "bank_dispatch", lambda *a, **k: ours_calls.append(1) or real_ours(*a, **k))
    monkeypatch.setitem(
        hf_moe.ALL_EXPERTS_FUNCTIONS._global_mapping,
        "grouped_mm",
        lambda *a, **k: stock_calls.append(1) or real_stock(*a, **k),
    )
    monkeypatch.setattr(
        hf_moe, "grouped_mm_experts_forward", hf_moe.ALL_EXPERTS_FUNCTIONS._global_mapping["grouped_mm"]
    )
    model, inputs = build("mixtral", torch.bfloat16)
    patch_model(model)
    logits(model, inputs)
    blocks = len(inspect_model(model).blocks)
    assert (len(ours_calls), len(stock_calls)) == ((blocks, 0) if ours else (0, blocks))


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "legacy-mixtral"])
def test_fp32_gradients_of_all_parameters_match(name):
    model, inputs = build(name)
    model.train()
    ids = inputs["input_ids"]

    def grads():
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    ref = grads()
    patch_model(model)
    torch.manual_seed(0)
    got = grads()
    assert ref.keys() == got.keys() and len(ref) > 10
    for n in ref:
        assert rel_diff(got[n], ref[n]) < 1e-4, n


def test_router_logits_and_aux_loss_are_unchanged():
    model, inputs = build("mixtral")
    with torch.no_grad():
        ref = model(**inputs, output_router_logits=True)
        patch_model(model)
        out = model(**inputs, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) > 1
    assert torch.equal(out.router_logits[0], ref.router_logits[0])  # same input, same router
    for a, b in zip(out.router_logits, ref.router_logits):  # later layers see fp32-rounding-close inputs
        assert rel_diff(a, b) < 1e-5
    assert torch.allclose(out.aux_loss, ref.aux_loss, rtol=1e-5)


def test_patch_works_on_a_peft_model_and_its_adapters_still_apply():
    from peft import LoraConfig, get_peft_model

    model, inputs = build("qwen3_moe")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    ref = logits(peft_model, inputs)
    report = patch_model(peft_model)
    assert report.patched
    assert rel_diff(logits(peft_model, inputs), ref) < 1e-5
    assert patch_model(peft_model.get_base_model()).already_patched  # same model, same patch
    unpatch_model(peft_model)
    assert torch.equal(logits(peft_model, inputs), ref)


def test_lora_added_after_patching_is_applied(monkeypatch):
    """Repacked ModuleList experts must notice adapters wrapped around them later."""
    from peft import LoraConfig, get_peft_model

    model, inputs = build("legacy-mixtral")
    patch_model(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["w1", "w2", "w3"], init_lora_weights=False))
    peft_model.eval()
    patched = logits(peft_model, inputs)
    unpatch_model(peft_model)
    assert rel_diff(patched, logits(peft_model, inputs)) < 1e-5


def test_generic_forward_defers_to_the_block_in_training():
    """Remote-code blocks attach auxiliary losses while training; the generic forward must not drop them."""
    from moe_patch.testing.legacy import DeepseekStyleGate

    class GateWithAux(DeepseekStyleGate):
        def forward(self, hidden_states):
            idx, w, _ = super().forward(hidden_states)
            return idx, w, (w.sum() * 0.01 if self.training else None)

    model, inputs = build("legacy-deepseek")
    for layer in model.layers:
        gate = GateWithAux(model.config)
        gate.load_state_dict(layer.block_sparse_moe.gate.state_dict())
        layer.block_sparse_moe.gate = gate
    assert patch_model(model).patched
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])  # a 0-d aux loss must not break routing
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("moe.gate.weight"))


def test_compiled_experts_capture_in_one_graph():
    model, inputs = build("qwen3_moe")
    patch_model(model)
    experts = model.get_submodule(inspect_model(model).blocks[0].experts_path)
    x = torch.randn(6, model.config.hidden_size)
    idx = torch.randint(0, model.config.num_experts, (6, 2))
    w = torch.rand(6, 2)
    with torch.no_grad():
        eager = experts(x, idx, w)
        compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")(x, idx, w)
    assert rel_diff(compiled, eager) < 1e-5


def test_compiled_patched_forward_matches_eager():
    model, inputs = build("qwen3_moe")
    patch_model(model)
    eager = logits(model, inputs)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = main_output(compiled(**inputs))
    assert rel_diff(out, eager) < 1e-5


# --------------------------------------------------------------------------- reports


def test_report_counts_total_and_active_parameters():
    model, _ = build("mixtral")
    report = inspect_model(model)
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    assert len(report.blocks) == cfg.num_hidden_layers
    assert all(b.num_experts == cfg.num_local_experts and b.top_k == cfg.num_experts_per_tok for b in report.blocks)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    inactive = cfg.num_hidden_layers * (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert
    assert report.active_params == report.total_params - inactive
    data = json.loads(report.to_json())
    assert data["active_params"] == report.active_params and len(data["blocks"]) == len(report.blocks)
    assert "experts_interface" in str(report) and "active/token" in str(report)


def test_inspect_reads_routing_and_layout_flags():
    blocks = {n: inspect_model(build(n)[0]).blocks[0] for n in ("deepseek_v3", "gpt_oss", "qwen3_moe", "llama4")}
    ds = blocks["deepseek_v3"].routing
    assert ds.kind == "sigmoid" and ds.correction_bias and ds.groups and ds.scaling_factor != 1.0
    assert (
        blocks["gpt_oss"].layout.transposed and blocks["gpt_oss"].layout.interleaved and blocks["gpt_oss"].layout.bias
    )
    assert blocks["gpt_oss"].routing.kind == "topk_softmax"
    assert blocks["qwen3_moe"].routing.kind == "softmax_topk"
    assert blocks["llama4"].adapter == "llama4_dense" and blocks["llama4"].routing.kind == "sigmoid_topk"


def test_inspect_works_on_the_meta_device():
    from transformers import AutoModelForCausalLM

    from moe_patch.testing.tiny import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    report = inspect_model(model)
    assert report.blocks and report.blocks[0].num_experts == model.config.num_experts


# --------------------------------------------------------------------------- bad input


def test_lists_of_mlps_that_are_not_experts_are_not_detected():
    """Residual MLP layers next to a 2-way classifier head look like 2 experts and a router."""
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Mlp(), Mlp()])
            self.head = nn.Linear(16, 2)

    model = Classifier()
    assert not inspect_model(model).has_moe
    assert not patch_model(model).patched


def test_a_model_without_moe_is_left_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    before = {n: p.clone() for n, p in model.state_dict().items()}
    report = patch_model(model)
    assert not report.patched and "no Mixture-of-Experts block" in str(report)
    assert not inspect_model(model).has_moe
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not moe_patch.patch.is_patched(model)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_experts_per_tok", 9, "exceeds"),
        ("num_experts_per_tok", 0, ">= 1"),
        ("num_experts_per_tok", "64 2", "must be an integer"),
        ("num_local_experts", 0, ">= 1"),
    ],
)
def test_inconsistent_configs_raise_value_error_naming_the_field(tmp_path, field, value, message):
    from moe_patch.detect.config import load_config
    from moe_patch.testing.tiny import tiny_config

    raw = tiny_config("mixtral").to_dict()
    raw[field] = value
    with pytest.raises(ValueError, match=field) as err:
        validate_moe_config(raw)
    assert message in str(err.value) and isinstance(err.value, MoEConfigError)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(MoEConfigError, match=field):  # the same from a checkpoint folder
        load_config(tmp_path)


def test_live_model_with_top_k_above_experts_is_refused_by_inspection():
    model, _ = build("qwen3_moe")
    for m in model.modules():
        if hasattr(m, "top_k"):
            m.top_k = 99
    with pytest.raises(MoEConfigError, match="top_k .* 99"):
        inspect_model(model)


def _break_router(model, *, value=None, index=None):
    router = next(m for n, m in model.named_modules() if n.endswith("mlp.gate"))
    real = router.forward

    def forward(x):
        logits, w, idx = real(x)
        if value is not None:
            w = torch.full_like(w, value)
        if index is not None:
            idx = torch.full_like(idx, index)
        return logits, w, idx

    router.forward = forward


def _routing_inputs(model, inputs, slots: str) -> dict:
    """The model's inputs, or enough tokens that the CPU check takes its tensor path (> 64 routing slots)."""
    if slots == "few":
        return inputs
    return {"input_ids": torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("slots", ["few", "many"])
def test_nan_router_weights_raise_an_error_naming_the_layer(slots):
    model, inputs = build("qwen3_moe")
    inputs = _routing_inputs(model, inputs, slots)
    patch_model(model)
    _break_router(model, value=float("nan"))
    with pytest.raises(RoutingError, match=r"model\.layers\.0\.mlp\.experts: non-finite routing weights"):
        logits(model, inputs)


@pytest.mark.parametrize("slots", ["few", "many"])
def test_out_of_range_expert_indices_raise_an_error_naming_the_layer(slots):
    model, inputs = build("qwen3_moe")
    inputs = _routing_inputs(model, inputs, slots)
    patch_model(model)
    _break_router(model, index=model.config.num_experts)
    with pytest.raises(RoutingError, match=r"model\.layers\.0\.mlp\.experts: router chose expert index 8"):
        logits(model, inputs)


def test_validation_can_be_switched_off_for_speed():
    model, inputs = build("qwen3_moe")
    patch_model(model, validate=False)
    _break_router(model, value=float("nan"))
    assert torch.isnan(logits(model, inputs)).any()  # no check, the NaN flows through as in transformers


def test_out_of_range_dataset_index_is_refused_for_per_image_experts():
    model, inputs = build("vitpose_backbone")
    patch_model(model)
    inputs = dict(inputs, dataset_index=torch.full_like(inputs["dataset_index"], 99))
    with pytest.raises(RoutingError, match="dataset_index 99"):
        logits(model, inputs)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_gpu_dispatch_path_is_transformers_grouped_kernels_behind_the_routing_check(name, monkeypatch):
    """On CUDA, decorated experts run transformers' sync-free grouped path after moe-patch's routing check.
    Forced here on CPU (the kernels exist on both) so CI covers the branch the GPU takes."""
    import moe_patch.dispatch.experts as experts

    monkeypatch.setattr(experts, "use_transformers_grouped", lambda hidden_states: True)
    model, inputs = build(name)
    ref = logits(model, inputs)
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-5
    if name == "mixtral":
        _break_router(model, value=float("nan"))
        with pytest.raises(RoutingError, match="non-finite routing weights"):
            logits(model, inputs)
