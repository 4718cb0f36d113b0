"""moe_patch.monitor: counts equal a direct count from the routers' own outputs, on every kind of block,
patched or not, offloaded, under peft; no host sync per layer; figures, stability, output files, bad input."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import moe_patch
from moe_patch import MoEConfigError, MoEPatchError, NoMoEFoundError
from moe_patch.families import find_moe_blocks
from moe_patch.monitoring import LayerCounts, RoutingReport
from moe_patch.testing.legacy import legacy_moe_model
from moe_patch.testing.tiny import tiny_model

# Expert capacity small enough that the 2 x 8 example tokens overflow it.
CAPACITY = {"switch_transformers": {"expert_capacity": 2}, "nllb-moe": {"moe_eval_capacity_token_fraction": 0.1}}


def build(name: str, seed: int = 0):
    if name.startswith("legacy-"):
        model = legacy_moe_model(name.split("-", 1)[1], seed=seed)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
        return model, {"input_ids": ids}
    return tiny_model(name, seed=seed, **CAPACITY.get(name, {}))


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)


# -- the oracle: each router's output, read the way its family's block reads it --------------------


def _expected_from_router(name: str, handle, out) -> dict:
    """Slots per expert (and, for capacity families, requested slots and dropped tokens) from one router
    output, computed directly and independently of moe_patch.monitoring."""
    E = handle.info.num_experts
    if name == "llama4":  # (scores, logits): sigmoid of the chosen logits, exactly 0 elsewhere
        return {"assigned": (out[0] > 0).sum(0).tolist()}
    if name == "jetmoe":  # the router's own per-expert sizes
        return {"assigned": list(out[3])}
    if name == "switch_transformers":  # (capacity-masked one-hot [B, S, E], top-1 prob, logits)
        mask = out[0].reshape(-1, E)
        asked = F.one_hot(out[2].reshape(-1, E).argmax(-1), E).sum(0)
        return {
            "assigned": mask.sum(0).tolist(),
            "requested": asked.tolist(),
            "dropped_tokens": int((mask.sum(-1) == 0).sum()),
        }
    if name == "nllb-moe":  # (top-1 mask, combine weights [T, E], logits): dispatched where the weight is > 0
        combine = out[1]
        asked = torch.zeros(E, dtype=torch.long)
        for i in out[2].topk(2, dim=-1).indices.flatten().tolist():
            asked[i] += 1
        return {
            "assigned": (combine > 0).sum(0).tolist(),
            "requested": asked.tolist(),
            "dropped_tokens": int(((combine > 0).sum(-1) == 0).sum()),
        }
    if name == "legacy-mixtral":  # logits; the block: softmax -> top-k
        idx = torch.topk(F.softmax(out.float(), dim=-1), handle.info.top_k, dim=-1).indices
    elif name == "legacy-deepseek":  # (topk_idx, topk_weight, aux)
        idx = out[0]
    elif name == "dbrx":  # logits; the block routes them itself
        idx = handle.block.route_tokens_to_experts(out)[1]
    else:  # transformers 5 routers: (logits, top-k weights, top-k indices)
        idx = out[2]
    width = E + handle.info.zero_experts  # LongCat-Flash's identity experts, wherever transformers counts them
    counts = [0] * width
    for i in idx.flatten().tolist():
        counts[i] += 1
    return {"assigned": counts}


def direct_counts(name: str, model, inputs) -> list[dict]:
    handles = find_moe_blocks(model)
    seen: list[list] = [[] for _ in handles]
    hooks = [h.router.register_forward_hook(lambda m, a, o, i=i: seen[i].append(o)) for i, h in enumerate(handles)]
    try:
        forward(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for handle, outputs in zip(handles, seen):
        total: dict = {}
        for o in outputs:
            for key, value in _expected_from_router(name, handle, o).items():
                total[key] = (
                    [a + b for a, b in zip(total[key], value)]
                    if isinstance(value, list) and key in total
                    else (total.get(key, 0) + value if key in total else value)
                )
        out.append(total)
    return out


ALL_KINDS = [
    "mixtral",
    "qwen2_moe",
    "deepseek_v3",
    "gpt_oss",
    "longcat_flash",
    "dbrx",
    "llama4",
    "jetmoe",
    "switch_transformers",
    "nllb-moe",
    "legacy-mixtral",
    "legacy-deepseek",
]


@pytest.mark.parametrize("patched", [False, True], ids=["hf", "patched"])
@pytest.mark.parametrize("name", ALL_KINDS)
def test_counts_equal_a_direct_count_from_the_router_outputs(name, patched):
    model, inputs = build(name)
    expected = direct_counts(name, model, inputs)
    if patched:
        moe_patch.patch_model(model)
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
        report = mon.report()
    assert not report.skipped
    assert len(report.layers) == len(expected)
    for layer, exp in zip(report.layers, expected):
        c = layer.counts
        assert c.assigned == exp["assigned"], c.path
        assert c.tokens * c.top_k == sum(exp.get("requested", exp["assigned"]))
        assert c.invalid == 0 and c.nonfinite == 0
        if "requested" in exp:  # capacity families
            assert c.requested == exp["requested"] and c.dropped_tokens == exp["dropped_tokens"]
            assert c.dropped_slot_share == pytest.approx(1 - sum(exp["assigned"]) / sum(exp["requested"]))


def test_capacity_drops_are_seen_when_capacity_overflows():
    model, inputs = build("switch_transformers")
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
    layers = mon.report().layers
    assert any(lr.counts.dropped_tokens > 0 for lr in layers)
    assert all(lr.figures()["dropped_slots"] >= 0 for lr in layers)
    assert "routing/dropped_slots_max" in mon.report().log_figures()


def test_router_figures_equal_their_definitions_on_the_router_logits():
    model, inputs = build("mixtral")
    handles = find_moe_blocks(model)
    outs = []
    hook = handles[0].router.register_forward_hook(lambda m, a, o: outs.append(o))
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
    hook.remove()
    logits, weights, index = outs[0]
    p = F.softmax(logits.float(), dim=-1)
    c = mon.report().layers[0].counts
    assert c.entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    assert c.z_loss == pytest.approx(float(torch.logsumexp(logits.float(), -1).square().mean()), rel=1e-5)
    assert c.topk_prob_mass == pytest.approx(float(p.gather(1, index).sum(-1).mean()), rel=1e-5)
    assert c.weight_mass == pytest.approx(float(weights.sum(-1).mean()), rel=1e-5)  # Mixtral renormalises: 1


def test_the_model_output_is_unchanged_and_close_removes_every_hook():
    model, inputs = build("qwen2_moe")
    moe_patch.patch_model(model)
    ref = forward(model, inputs).logits
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    mon = moe_patch.monitor(model)
    assert torch.equal(forward(model, inputs).logits, ref)
    mon.close()
    mon.close()  # idempotent
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    tokens = mon.report().layers[0].counts.tokens
    forward(model, inputs)
    assert mon.report().layers[0].counts.tokens == tokens  # nothing counted after close


# -- no host sync per layer --------------------------------------------------------------------------

_HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every tensor method that moves data to the host (a device sync on a GPU)."""
    calls = {"n": 0}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            calls["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    original_nonzero = torch.nonzero

    def nonzero(*a, **k):
        calls["n"] += 1
        return original_nonzero(*a, **k)

    monkeypatch.setattr(torch, "nonzero", nonzero)
    return calls


@pytest.mark.parametrize("name", ["mixtral", "llama4", "jetmoe", "switch_transformers", "legacy-mixtral"])
def test_monitoring_adds_no_host_read_to_a_forward(name, host_reads):
    model, inputs = build(name)
    moe_patch.patch_model(model, validate=False)
    forward(model, inputs)  # warm-up (lazy initialisation in transformers)
    host_reads["n"] = 0
    forward(model, inputs)
    plain = host_reads["n"]
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)  # first call allocates the accumulators
        host_reads["n"] = 0
        forward(model, inputs)
        assert host_reads["n"] == plain
        host_reads["n"] = 0
        mon.report()
        assert host_reads["n"] <= 2, "one transfer per accumulator dtype, whatever the number of layers"


# -- stability -----------------------------------------------------------------------------------


def test_stability_is_the_share_of_tokens_whose_top1_expert_moved():
    model, inputs = build("mixtral")
    handles = find_moe_blocks(model)
    with moe_patch.monitor(model) as mon:
        mon.check_stability(inputs)
        assert mon.report().layers[0].top1_changed is None  # one check: no comparison yet
        mon.check_stability(inputs)
        assert [lr.top1_changed for lr in mon.report().layers] == [0.0, 0.0]

        def top1(layer: int):
            outs = []
            h = handles[layer].router.register_forward_hook(lambda m, a, o: outs.append(o[2][:, 0].clone()))
            forward(model, inputs)
            h.remove()
            return outs[0]

        before = top1(0)
        with torch.no_grad():
            handles[0].router.weight.add_(torch.randn_like(handles[0].router.weight))
        after = top1(0)
        mon.check_stability(inputs)
        assert mon.report().layers[0].top1_changed == pytest.approx(float((before != after).float().mean()))
        # only the two forwards of top1() were counted: checks are not traffic
        assert mon.report().layers[0].counts.tokens == 2 * inputs["input_ids"].numel()
        with pytest.raises(MoEConfigError, match="differ from the previous check"):
            mon.check_stability({"input_ids": inputs["input_ids"].flip(0)})


def test_stability_check_restores_each_module_mode():
    model, inputs = build("mixtral")
    model.train()
    model.model.embed_tokens.eval()
    with moe_patch.monitor(model) as mon:
        mon.check_stability(inputs)
    assert model.training and not model.model.embed_tokens.training


# -- models the monitor must work on ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "module_list"])
def test_offloaded_model_counts_equal_the_resident_model(family, tmp_path):
    from tests.helpers.offload import expert_bytes, load_reference, model_class, prompts, save_tiny

    path = save_tiny(family, tmp_path / "ckpt")
    ids = {"input_ids": prompts(2, 10)}
    resident = load_reference(family, path)
    with moe_patch.monitor(resident) as mon:
        forward(resident, ids)
    expected = [lr.counts.assigned for lr in mon.report().layers]
    offloaded = moe_patch.load_model(
        path, model_class=model_class(family), dtype=torch.float32, expert_cache=expert_bytes(family)
    )
    with moe_patch.monitor(offloaded) as mon:
        forward(offloaded, ids)
    assert [lr.counts.assigned for lr in mon.report().layers] == expected
    moe_patch.offload.get_offload_handle(offloaded).detach()


def test_peft_model_with_lora_on_attention():
    from peft import LoraConfig, get_peft_model

    model, inputs = build("qwen3_moe")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = direct_counts("qwen3_moe", peft_model, inputs)
    moe_patch.patch_model(peft_model)
    with moe_patch.monitor(peft_model) as mon:
        forward(peft_model, inputs)
    assert [lr.counts.assigned for lr in mon.report().layers] == [e["assigned"] for e in expected]


def test_peft_model_with_lora_on_fused_experts_keeps_router_figures():
    from peft import get_peft_model

    from moe_patch.training import expert_lora_config

    model, inputs = build("mixtral")
    expected = direct_counts("mixtral", model, inputs)  # B = 0 at init: the same routing
    peft_model = get_peft_model(model, expert_lora_config(model, r=4))
    moe_patch.patch_model(peft_model)
    with moe_patch.monitor(peft_model) as mon:
        forward(peft_model, inputs)
    report = mon.report()
    assert [lr.counts.assigned for lr in report.layers] == [e["assigned"] for e in expected]
    assert all(not math.isnan(lr.counts.entropy) for lr in report.layers)  # router found through ParamWrapper


def test_gradient_checkpointing_recomputation_is_not_counted_twice():
    model, inputs = build("mixtral")
    model.gradient_checkpointing_enable()
    model.train()
    with moe_patch.monitor(model) as mon:
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert mon.report().layers[0].counts.tokens == inputs["input_ids"].numel()


def test_when_train_leaves_evaluation_out():
    model, inputs = build("mixtral")
    with moe_patch.monitor(model, when="train") as mon:
        forward(model, inputs)  # eval mode
        assert mon.report().calls == 0 and mon.report().layers[0].counts.tokens == 0
        model.train()
        forward(model, inputs)
        assert mon.report().calls == 1


def test_non_finite_router_logits_are_counted():
    model, inputs = build("mixtral")  # unpatched: a patched model would refuse to dispatch them
    with torch.no_grad():
        find_moe_blocks(model)[0].router.weight[0, 0] = float("nan")
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
    first, second = mon.report().layers
    assert first.counts.nonfinite == inputs["input_ids"].numel()
    assert "routing/nonfinite" in mon.report().log_figures() and mon.report().log_figures()["routing/nonfinite"] > 0
    assert first.counts.logit_tokens == 0


# -- windows, output, bad input -------------------------------------------------------------------


def test_snapshots_are_windows_and_the_report_is_their_sum():
    model, inputs = build("mixtral")
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
        first = mon.snapshot(step=1)
        forward(model, inputs)
        forward(model, inputs)
        second = mon.snapshot(step=2)
        total = mon.report()
    assert [r.step for r in mon.history] == [1, 2] and second.calls == 2 and total.calls == 3
    for a, b, t in zip(first.layers, second.layers, total.layers):
        assert b.counts.assigned == [2 * x for x in a.counts.assigned]  # same input twice
        assert t.counts.assigned == [x + y for x, y in zip(a.counts.assigned, b.counts.assigned)]


def test_summary_json_and_plot(tmp_path):
    model, inputs = build("nllb-moe")
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
        mon.snapshot(step=1)
        forward(model, inputs)
        mon.snapshot(step=2)
    table = mon.summary()
    assert "load CV" in table and mon.layers[0] in table
    data = json.loads(mon.to_json())
    assert len(data["history"]) == 2
    again = RoutingReport.from_dict(data)
    assert [lr.counts.assigned for lr in again.layers] == [lr.counts.assigned for lr in mon.report().layers]
    path = mon.plot(tmp_path / "sub" / "routing.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["routing.png"]  # no temporary file left


def test_plot_without_matplotlib_names_the_install(tmp_path, monkeypatch):
    model, inputs = build("mixtral")
    with moe_patch.monitor(model) as mon:
        forward(model, inputs)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MoEPatchError, match="pip install matplotlib"):
        mon.plot(tmp_path / "r.png")
    assert not (tmp_path / "r.png").exists()


def test_a_model_without_moe_blocks_is_refused_in_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(NoMoEFoundError, match="no Mixture-of-Experts block") as err:
        moe_patch.monitor(dense)
    assert "\n" not in str(err.value)
    with pytest.raises(MoEConfigError, match="when="):
        moe_patch.monitor(build("mixtral")[0], when="sometimes")


def test_blocks_whose_routing_hooks_cannot_see_are_listed_not_guessed():
    model, inputs = tiny_model("vitpose_backbone")
    with pytest.raises(NoMoEFoundError, match="per_input"):
        moe_patch.monitor(model)


# -- the maths --------------------------------------------------------------------------------------


def test_balance_figures_of_hand_made_counts():
    balanced = LayerCounts("x", num_experts=4, top_k=1, tokens=8, assigned=[2, 2, 2, 2])
    collapsed = LayerCounts("x", num_experts=4, top_k=1, tokens=8, assigned=[8, 0, 0, 0])
    assert (balanced.load_cv, balanced.max_over_mean, balanced.idle_share) == (0.0, 1.0, 0.0)
    assert collapsed.load_cv == pytest.approx(math.sqrt(3)) and collapsed.max_over_mean == 4.0
    assert collapsed.idle_share == 0.75
    merged = balanced + collapsed
    assert merged.assigned == [10, 2, 2, 2] and merged.tokens == 16
    assert math.isnan(LayerCounts("x", num_experts=4, top_k=1).load_cv)  # nothing routed: no figure
    zero = LayerCounts("x", num_experts=2, top_k=1, zero_experts=2, tokens=4, assigned=[1, 1, 2, 0])
    assert zero.load == [1, 1] and zero.load_cv == 0.0 and zero.zero_expert_share == 0.5
