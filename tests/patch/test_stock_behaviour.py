"""A patched model behaves as a stock one wherever it is not about speed: transformers' experts switch,
odd expert widths, storage and state dicts, the attributes transformers reads, and copies."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from moe_patch import inspect_model, patch_model, unpatch_model
from moe_patch.dispatch import experts as experts_dispatch
from moe_patch.dispatch.core import plan_dispatch
from moe_patch.dispatch.experts import ExpertBank, bank_dispatch, bank_expert, glu
from moe_patch.dispatch.reference import reference_dispatch
from moe_patch.families.module_list import PACK_ATTR
from moe_patch.patch import is_patched
from moe_patch.testing.compare import rel_diff
from moe_patch.testing.tiny import tiny_config
from tests.patch.patch_helpers import build, logits, undeclared_shared_storage


@pytest.fixture
def dispatch_calls(monkeypatch):
    """Counts calls of moe-patch's dispatch: its registered experts implementation (which may hand the
    maths to the stock kernel where that is faster, after its routing check), and every adapter's."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from moe_patch.families import base, fused, jetmoe, module_list

    calls = []
    fused.register_experts_implementation()
    real = ALL_EXPERTS_FUNCTIONS["moe_patch"]
    monkeypatch.setitem(
        ALL_EXPERTS_FUNCTIONS._global_mapping, "moe_patch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for mod in (fused, module_list, base, jetmoe):  # base: the resident runner of Llama 4 and DBRX
        real_dispatch = mod.bank_dispatch
        monkeypatch.setattr(
            mod, "bank_dispatch", lambda *a, _real=real_dispatch, **k: calls.append(1) or _real(*a, **k)
        )
    return calls


# ------------------------------------------------------------------ 1. model.set_experts_implementation


def test_set_experts_implementation_takes_effect_on_a_patched_model(dispatch_calls):
    model, inputs = build("mixtral")
    model.set_experts_implementation("eager")
    eager = logits(model, inputs)
    model.set_experts_implementation("grouped_mm")
    patch_model(model)

    model.set_experts_implementation("eager")
    dispatch_calls.clear()
    assert torch.equal(logits(model, inputs), eager)  # transformers' own eager loop ran ...
    assert not dispatch_calls  # ... and moe-patch did not
    assert not is_patched(model)
    assert not unpatch_model(model)  # it reports what was true: moe-patch dispatched nothing
    assert model.config._experts_implementation == "eager"  # and leaves the user's choice alone


@pytest.fixture
def kernel_calls(monkeypatch):
    """Which of transformers' experts implementations ran: each registered one wrapped to record its name (as
    transformers' own test_eager_matches_batched_and_grouped_inference does with mocks); the eager forward is the
    class's own, recorded through the decorator's fallback."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    calls: list[str] = []
    for name in ("grouped_mm", "batched_mm"):
        real = ALL_EXPERTS_FUNCTIONS[name]
        monkeypatch.setitem(
            ALL_EXPERTS_FUNCTIONS._global_mapping,
            name,
            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k),
        )
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["grouped_mm", "batched_mm", "eager"])
def test_an_explicit_choice_runs_that_implementation_in_every_dtype(name, dtype, dispatch_calls, kernel_calls):
    """`set_experts_implementation(name)` on a patched model runs `name`, also the one moe-patch stood in for
    (grouped_mm, transformers' default: for transformers the call changes nothing, and the half-precision
    experts used to stay on moe-patch's calibrated fp32 path)."""
    model, inputs = build("mixtral", dtype=dtype)
    model.set_experts_implementation(name)
    stock = logits(model, inputs)
    kernel_calls.clear()
    patch_model(model)
    model.set_experts_implementation(name)
    assert model.config._experts_implementation == name and not is_patched(model)
    assert torch.equal(logits(model, inputs), stock)
    blocks = len(inspect_model(model).blocks)
    assert not dispatch_calls and kernel_calls == ([] if name == "eager" else [name] * blocks)


def test_implementations_chosen_in_turn_each_run_as_transformers_test_switches_them(dispatch_calls, kernel_calls):
    """The sequence of transformers' test_eager_matches_batched_and_grouped_inference, on a model patched when
    built: eager, batched_mm, grouped_mm, each checked to run, in fp16."""
    model, inputs = build("mixtral", dtype=torch.float16)
    patch_model(model)
    blocks = len(inspect_model(model).blocks)
    for name in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(name)
        kernel_calls.clear()
        logits(model, inputs)
        assert kernel_calls == ([] if name == "eager" else [name] * blocks) and not dispatch_calls


@pytest.mark.parametrize("how", ["inner model", "dict", "deepcopy", "pickled"])
def test_the_choice_is_honoured_however_it_is_made(how, dispatch_calls, kernel_calls):
    model, inputs = build("mixtral", dtype=torch.float16)
    patch_model(model)
    if how == "inner model":
        model.model.set_experts_implementation("grouped_mm")
    elif how == "dict":
        model.set_experts_implementation({"": "grouped_mm"})
    elif how == "deepcopy":
        model = copy.deepcopy(model)
        model.set_experts_implementation("grouped_mm")
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        model = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
        model.set_experts_implementation("grouped_mm")
    kernel_calls.clear()
    logits(model, inputs)
    assert kernel_calls and not dispatch_calls and not is_patched(model)


def test_a_patched_model_is_freed_when_its_last_reference_goes():
    """No reference cycle through the model's set_experts_implementation: `del model` frees it at once, without
    waiting for the garbage collector (a model's weights can be gigabytes)."""
    import gc
    import weakref

    model, _ = build("mixtral")
    patch_model(model)
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None
    finally:
        gc.enable()


def test_only_patch_model_hands_the_experts_back_to_moe_patch(dispatch_calls):
    model, inputs = build("mixtral")
    patch_model(model)
    model.set_experts_implementation("batched_mm")
    assert not is_patched(model)
    model.set_experts_implementation("grouped_mm")  # what moe-patch stood in for: now an explicit choice
    assert not is_patched(model)
    logits(model, inputs)
    assert not dispatch_calls
    report = patch_model(model)
    assert report.patched and not report.already_patched and is_patched(model)
    logits(model, inputs)
    assert len(dispatch_calls) == len(inspect_model(model).blocks)
    assert unpatch_model(model) and "set_experts_implementation" not in vars(model)


def test_patch_model_after_switching_away_patches_anew(dispatch_calls):
    model, inputs = build("mixtral")
    patch_model(model)
    model.set_experts_implementation("eager")
    report = patch_model(model)
    assert not report.already_patched and report.patched and is_patched(model)
    logits(model, inputs)
    assert dispatch_calls
    assert unpatch_model(model)
    assert model.config._experts_implementation == "eager"


def test_a_model_sharing_the_config_of_a_patched_one_runs_stock(dispatch_calls):
    from transformers import MixtralForCausalLM

    config = tiny_config("mixtral")
    patched, stock = MixtralForCausalLM(config).eval(), MixtralForCausalLM(config).eval()
    patch_model(patched)
    ids = torch.randint(0, config.vocab_size, (2, 8))
    logits(stock, {"input_ids": ids})
    assert not dispatch_calls and not is_patched(stock)
    logits(patched, {"input_ids": ids})
    assert dispatch_calls


# ------------------------------------------------------------------ 2. expert widths the grouped kernel rejects

ODD = 37  # 148 fp32 bytes: not a multiple of 16

ODD_WIDTH = {  # one family per adapter that runs expert GEMMs, and decorated layouts
    "mixtral": dict(intermediate_size=ODD),  # decorated, [gate; up]
    "gpt_oss": dict(intermediate_size=ODD),  # decorated, transposed, biased, interleaved
    "longcat_flash": dict(expert_ffn_hidden_size=ODD),  # zero-computation experts
    "step3p7": dict(text_config={"moe_intermediate_size": ODD}),  # undecorated fused
    "llama4": dict(text_config={"intermediate_size": ODD}),
    "dbrx": dict(ffn_config={"ffn_hidden_size": ODD}),
    "jetmoe": dict(intermediate_size=ODD),
    "switch_transformers": dict(d_ff=ODD),
    "nllb-moe": dict(encoder_ffn_dim=ODD, decoder_ffn_dim=ODD),
    "vitpose_backbone": dict(part_features=ODD),
    "legacy-mixtral": dict(intermediate_size=ODD),
    "legacy-deepseek": dict(intermediate_size=ODD),
}


@pytest.mark.parametrize("name", ODD_WIDTH)
def test_odd_expert_widths_run_where_the_grouped_kernel_cannot(name):
    model, inputs = build(name, **ODD_WIDTH[name])
    assert {b.intermediate_size for b in inspect_model(model).blocks} == {ODD}
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # transformers' default grouped_mm rejects them too
    ref = logits(model, inputs)
    assert patch_model(model).patched
    assert rel_diff(logits(model, inputs), ref) < 1e-5


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_odd_widths_also_run_on_the_gpu_path(name, monkeypatch):
    """On CUDA decorated experts run transformers' grouped path, which would hand the kernel odd widths
    unchecked; forced here on CPU (the kernels exist on both)."""
    monkeypatch.setattr(experts_dispatch, "use_transformers_grouped", lambda hidden_states: True)
    model, inputs = build(name, **ODD_WIDTH[name])
    model.set_experts_implementation("eager")
    ref = logits(model, inputs)
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-5


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_odd_widths_under_transformers_default_grouped_mm_run_the_checked_loop(name):
    """Stock grouped_mm hands odd widths to the kernel and fails; the patched model, which defers to the
    implementation it replaced where that is faster, checks the kernel's preconditions first."""
    model, inputs = build(name, **ODD_WIDTH[name])
    model.set_experts_implementation("eager")
    ref = logits(model, inputs)
    model.set_experts_implementation("grouped_mm")
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-5


def test_bf16_widths_aligned_only_in_fp32_are_also_checked():
    model, inputs = build("mixtral", dtype=torch.bfloat16, intermediate_size=36)  # 72 bf16 bytes
    model.set_experts_implementation("eager")
    ref = logits(model, inputs)
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 2e-2


@pytest.mark.parametrize("name", ["mixtral", "dbrx", "legacy-mixtral"])
def test_float64_experts_run_where_the_grouped_kernel_cannot(name):
    model, inputs = build(name, dtype=torch.float64)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    ref = logits(model, inputs)
    patch_model(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-12


def test_the_kernel_check_follows_the_weights_when_they_change_dtype(monkeypatch):
    """The grouped-kernel precondition is checked once per layer and weights, not once per call: a model
    patched in fp32 and then cast to float64 (which the kernel refuses) falls back to the loop, and
    unpatching leaves no cache behind."""
    from moe_patch.families import kernel as family_kernel

    monkeypatch.setattr(family_kernel, "kernel_wins", lambda dtype, rows: False)  # not the CPU kernels' path
    model, inputs = build("mixtral")
    model.set_experts_implementation("grouped_mm")
    patch_model(model)
    logits(model, inputs)
    experts = [m for m in model.modules() if "_moe_patch_cache_kernel_accepts" in m.__dict__]
    assert experts and all(m.__dict__["_moe_patch_cache_kernel_accepts"][1] for m in experts)
    model.double()
    out = logits(model, inputs)
    assert not any(m.__dict__["_moe_patch_cache_kernel_accepts"][1] for m in experts)
    unpatch_model(model)
    assert not any("_moe_patch_cache_kernel_accepts" in m.__dict__ for m in model.modules())
    model.set_experts_implementation("eager")
    assert rel_diff(out, logits(model, inputs)) < 1e-12


@pytest.mark.parametrize("hidden, inter, transposed", [(64, ODD, False), (64, ODD, True), (ODD, 32, False)])
def test_bank_dispatch_falls_back_to_the_loop_for_unaligned_banks(hidden, inter, transposed):
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(4, 2 * inter, hidden, generator=g), torch.randn(4, hidden, inter, generator=g)
    if transposed:
        up, down = up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    bank = ExpertBank(up=up, down=down, activate=glu(torch.nn.functional.silu), transposed=transposed)
    x, idx, w = torch.randn(9, hidden, generator=g), torch.randint(0, 4, (9, 2), generator=g), torch.rand(9, 2)
    ref = reference_dispatch(x, idx, w, 4, lambda e, rows: bank_expert(bank, e, rows))
    with torch.no_grad():
        assert rel_diff(bank_dispatch(bank, x, idx, w, plan=plan_dispatch(idx, 4)), ref) < 1e-5


# ------------------------------------------------------------------ 3. repacked ModuleList experts: storage


@pytest.mark.parametrize("name", ["legacy-mixtral", "switch_transformers"])
def test_repacked_experts_share_no_storage_and_save_reload_with_stock_transformers(name, tmp_path):
    import safetensors.torch

    model, inputs = build(name)
    ref = logits(model, inputs)
    assert not undeclared_shared_storage(model)
    patch_model(model)
    assert not undeclared_shared_storage(model)
    assert rel_diff(logits(model, inputs), ref) < 1e-5  # the pack is in use, and exact

    model.save_pretrained(tmp_path)
    stock, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(stock.eval(), inputs), ref)
    state = {k: v for k, v in model.state_dict().items() if k not in model.all_tied_weights_keys}
    safetensors.torch.save_file(state, tmp_path / "plain.safetensors")  # refuses shared tensors
    assert safetensors.torch.load_file(tmp_path / "plain.safetensors").keys() == state.keys()


def test_eval_mode_gradients_reach_repacked_experts():
    """The pack is not what autograd tracks: with gradients on it must not be used, even in eval mode."""
    model, inputs = build("legacy-mixtral")
    patch_model(model)
    out = model(**inputs, labels=inputs["input_ids"])  # eval mode, gradients enabled
    out.loss.backward()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts)


def test_repacked_experts_follow_the_model_to_another_dtype(dispatch_calls):
    model, inputs = build("legacy-mixtral")
    ref = logits(model, inputs)
    patch_model(model)
    model.to(torch.bfloat16)
    dispatch_calls.clear()
    assert rel_diff(logits(model, inputs).float(), ref) < 2e-2
    assert dispatch_calls  # repacked in bf16, not left on a stale fp32 pack


def test_repacking_under_inference_mode_leaves_the_experts_trainable():
    model, inputs = build("legacy-mixtral")
    patch_model(model)
    model.to(torch.float64)  # the pack is stale; the next inference repacks
    with torch.inference_mode():
        model(**inputs)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()


def test_experts_in_shared_memory_stay_shared():
    model, inputs = build("legacy-mixtral")
    patch_model(model)
    model.share_memory()  # e.g. for torch.multiprocessing workers: repacking must not move them out
    logits(model, inputs)
    assert all(p.is_shared() for p in model.parameters())


# ------------------------------------------------------------------ 4. attributes transformers reads

ADAPTER_FAMILIES = [
    "mixtral",
    "longcat_flash",
    "step3p7",
    "llama4",
    "dbrx",
    "jetmoe",
    "switch_transformers",
    "nllb-moe",
    "vitpose_backbone",
    "legacy-mixtral",
]
# transformers recognises @use_experts_implementation experts by these (expert parallelism, exporters).
DECORATED_MARKS = ("has_gate", "is_transposed", "has_bias", "has_post_expert_norm", "is_concatenated", "_apply_gate")


#: Instance attributes patching may set: an instance forward (how undecorated layouts are patched) and, on models
#: holding decorated experts, transformers' own set_experts_implementation followed by handing the experts over.
INSTANCE_OVERRIDES = ("forward", "set_experts_implementation")


def _public_attributes(model) -> dict[str, frozenset[str]]:
    """Each module's public instance attributes and decorated-experts marks; :data:`INSTANCE_OVERRIDES` aside."""
    return {
        n: frozenset(k for k in m.__dict__ if not k.startswith("_") and k not in INSTANCE_OVERRIDES)
        | frozenset(k for k in DECORATED_MARKS if hasattr(m, k))
        for n, m in model.named_modules()
    }


@pytest.mark.parametrize("name", ADAPTER_FAMILIES)
def test_patching_adds_no_public_or_decorated_experts_attribute(name):
    model, _ = build(name)
    before = _public_attributes(model)
    patch_model(model)
    assert _public_attributes(model) == before


class PlainFusedExperts(torch.nn.Module):
    """Fused [gate; up] experts with transformers 5's call signature and no experts decorator, as step3p7's and
    LongCat-Flash's were before transformers 5.25 decorated them: the layout the ``fused_plain`` family drives."""

    def __init__(self, experts: torch.nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = experts.gate_up_proj, experts.down_proj, experts.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.down_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            gate, up = torch.nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


@pytest.mark.parametrize("name", ["plain-fused", "longcat_flash"])
def test_patched_undecorated_experts_are_not_taken_for_decorated_ones(name):
    from moe_patch.families import find_moe_blocks
    from moe_patch.families.fused import is_decorated

    if name == "plain-fused":  # on every transformers: mixtral's experts without the decorator
        model, inputs = build("mixtral")
        for handle in find_moe_blocks(model):
            handle.block.experts = PlainFusedExperts(handle.experts)
        adapter = "fused_plain"
    else:  # LongCat-Flash's zero-computation experts, undecorated before transformers 5.25
        model, inputs = build(name)
        if is_decorated(find_moe_blocks(model)[0].experts):
            pytest.skip("this transformers decorates LongCat-Flash's experts (its block routes the zero experts)")
        adapter = "zero_experts"
    want = logits(model, inputs)
    patch_model(model)
    report = inspect_model(model)
    assert {b.adapter for b in report.blocks} == {adapter}
    assert rel_diff(logits(model, inputs), want) < 1e-5
    experts = model.get_submodule(report.blocks[0].experts_path)
    assert not hasattr(experts, "has_gate") and not hasattr(experts, "is_transposed")


# ------------------------------------------------------------------ 5. copies


@pytest.mark.parametrize("name", ["mixtral", "dbrx", "legacy-mixtral"])
@pytest.mark.parametrize("unpatched", ["copy", "original"])
def test_deepcopy_carries_its_own_patch(name, unpatched, dispatch_calls):
    model, inputs = build(name)
    ref = logits(model, inputs)
    patch_model(model)
    twin = copy.deepcopy(model)
    assert is_patched(twin)
    assert rel_diff(logits(twin, inputs), ref) < 1e-5

    gone, kept = (twin, model) if unpatched == "copy" else (model, twin)
    assert unpatch_model(gone)
    assert not is_patched(gone) and is_patched(kept)
    assert torch.equal(logits(gone, inputs), ref)  # back on the stock forward
    assert rel_diff(logits(kept, inputs), ref) < 1e-5
    dispatch_calls.clear()
    logits(gone, inputs)
    assert not dispatch_calls
    logits(kept, inputs)
    assert dispatch_calls
    assert unpatch_model(kept) and not unpatch_model(gone)


def test_a_copy_of_repacked_experts_does_not_duplicate_the_pack():
    model, inputs = build("legacy-mixtral")
    patch_model(model)
    twin = copy.deepcopy(model)
    experts = twin.layers[0].block_sparse_moe.experts
    weights = [p for p in experts.parameters()]
    logits(twin, inputs)
    # The copy's own parameters were packed (not a second copy of them next to the original's pack).
    bank = getattr(experts, PACK_ATTR).packed
    start, size = bank.up.data_ptr(), bank.up.numel() * bank.up.element_size()
    assert any(start <= p.data_ptr() < start + size for p in weights)


@pytest.mark.parametrize("name", ["mixtral", "legacy-mixtral", "switch_transformers"])
def test_torch_save_of_a_patched_state_dict_loads_into_a_stock_model(name):
    model, inputs = build(name)
    ref = logits(model, inputs)
    stock_keys = list(model.state_dict())
    patch_model(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert list(state) == stock_keys
    fresh, _ = build(name)
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(state)
    assert torch.equal(logits(fresh, inputs), ref)
