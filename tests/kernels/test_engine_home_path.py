"""The offload engine's short path on a CPU: when every expert of a layer has a slot of its own (nothing is ever
evicted) and every routed expert of the call is in its slot, a layer is the routing check, the statistics and one
kernel call; the next layer's router runs ahead only while that layer still misses. Same tokens and the same
statistics as the full path, the same errors for bad routing and non-finite outputs."""

from __future__ import annotations

import pytest
import torch

import moe_patch
from moe_patch.errors import ExpertOutputError, RoutingError
from moe_patch.offload import get_offload_handle
from moe_patch.offload.engine import OffloadEngine
from tests.helpers.offload import greedy, load_reference, prompts, save_tiny

NEW = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("home") / "qwen3_moe")


@pytest.fixture
def home_calls(monkeypatch):
    calls = []
    original = OffloadEngine._dispatch_home
    monkeypatch.setattr(
        OffloadEngine,
        "_dispatch_home",
        lambda self, spec, *a, **k: calls.append(spec.index) or original(self, spec, *a, **k),
    )
    return calls


def _load(path):
    return moe_patch.load_model(path, dtype=torch.float32)  # every expert fits: a slot of its own each


def test_the_short_path_generates_the_same_tokens_and_statistics_as_the_full_one(
    checkpoint, home_calls, kernel_status, monkeypatch
):
    want = greedy(load_reference("qwen3_moe", checkpoint), prompts(2), NEW)
    short = _load(checkpoint)
    assert torch.equal(greedy(short, prompts(2), NEW), want)
    assert home_calls  # the short path ran, once the routed experts were in their slots
    monkeypatch.setattr(OffloadEngine, "_home_map", lambda self, layer: None)  # the full path only
    full = _load(checkpoint)
    assert torch.equal(greedy(full, prompts(2), NEW), want)
    a, b = get_offload_handle(short).stats, get_offload_handle(full).stats
    for la, lb in zip(a.layers, b.layers, strict=True):  # the same routing counted; where a use was served from
        assert torch.equal(la.slot_counts, lb.slot_counts) and la.requests == lb.requests  # depends on read-ahead


def test_the_next_router_runs_ahead_only_while_its_layer_misses(checkpoint, kernel_status):
    model = _load(checkpoint)
    engine = get_offload_handle(model).engine
    assert engine._predicts(1)  # never called: it may miss
    greedy(model, prompts(2), NEW)
    engine._missed[1] = False
    assert not engine._predicts(1)  # its last call found every routed expert in its slot
    engine._missed[1] = True
    assert engine._predicts(1)
    assert not engine._predicts(len(engine.layers))  # no layer after the last


def test_bad_routing_on_the_short_path_raises_naming_the_layer(checkpoint, home_calls, kernel_status):
    model = _load(checkpoint)
    greedy(model, prompts(2), NEW)
    engine = get_offload_handle(model).engine
    layer = engine.layers[0]
    x = torch.randn(1, model.config.hidden_size)
    routed = engine._home_map(0)
    idx = (routed[:-1] >= 0).nonzero().flatten()[:2].unsqueeze(0)  # two experts in their slots
    home_calls.clear()
    with torch.no_grad(), pytest.raises(RoutingError, match="non-finite routing weights"):
        engine.dispatch(0, x, idx, torch.tensor([[float("nan"), 0.5]]), checked_by=layer.experts)
    assert home_calls == [0]


def test_a_non_finite_expert_output_on_the_short_path_names_the_expert(checkpoint, home_calls, kernel_status):
    model = _load(checkpoint)
    greedy(model, prompts(2), NEW)
    engine = get_offload_handle(model).engine
    group, home = engine.dev.group_of[0], engine._home_map(0)
    first, second = (home[:-1] >= 0).nonzero().flatten()[:2].tolist()
    assert group.slab is not None
    for t in group.slab.view(int(home[first])).values():
        t.fill_(float("inf"))  # that expert of layer 0 now overflows
    x = torch.randn(1, model.config.hidden_size)
    home_calls.clear()
    with torch.no_grad():
        engine.dispatch(0, x, torch.tensor([[first, second]]), torch.tensor([[0.5, 0.5]]))
        assert home_calls == [0]
        with pytest.raises(ExpertOutputError, match=f"expert {first} "):
            engine.check_outputs()
