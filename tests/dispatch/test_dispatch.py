"""Dispatch maths: every fast path equals the plain reference, on the edge cases of routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_patch.dispatch.core import dispatch_combine, plan_dispatch
from moe_patch.dispatch.experts import ExpertBank, bank_dispatch, bank_expert, bank_grouped
from moe_patch.dispatch.reference import reference_dispatch
from moe_patch.testing.compare import rel_diff

H, I = 16, 8  # noqa: E741 - hidden and intermediate sizes, as the papers name them


def _bank(E: int, *, transposed=False, bias=False, split_gate=False) -> ExpertBank:
    g = torch.Generator().manual_seed(E)
    up_rows = I if split_gate else 2 * I
    up = torch.randn(E, up_rows, H, generator=g)
    down = torch.randn(E, H, I, generator=g)
    gate = torch.randn(E, I, H, generator=g) if split_gate else None
    if transposed:
        up, down = up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
        gate = gate.transpose(1, 2).contiguous() if gate is not None else None

    def activate(h, u=None):
        if u is not None:  # split gate: activate(gate_out, up_out)
            return F.silu(h) * u
        a, b = h.chunk(2, dim=-1)
        return F.silu(a) * b

    return ExpertBank(
        up=up,
        down=down,
        gate=gate,
        activate=activate,
        transposed=transposed,
        up_bias=torch.randn(E, up_rows, generator=g) if bias else None,
        down_bias=torch.randn(E, H, generator=g) if bias else None,
    )


def _routing(T: int, E: int, k: int, *, all_to: int | None = None):
    g = torch.Generator().manual_seed(T * 100 + E + k)
    if all_to is not None:
        idx = torch.full((T, k), all_to, dtype=torch.long)
        if k > 1:
            idx[:, 1:] = (all_to + torch.arange(1, k)) % E
    else:
        idx = (
            torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
            if T
            else torch.empty(0, k, dtype=torch.long)
        )
    w = torch.rand(T, k, generator=g)
    return idx, w


CASES = {
    "typical": dict(T=33, E=8, k=2),
    "one token": dict(T=1, E=8, k=2),
    "empty batch": dict(T=0, E=8, k=2),
    "k = 1": dict(T=20, E=8, k=1),
    "k = E": dict(T=12, E=4, k=4),
    "experts without tokens": dict(T=3, E=64, k=2),
    "all tokens to one expert": dict(T=40, E=8, k=1, all_to=5),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("layout", ["plain", "transposed", "bias", "split gate"])
def test_loop_and_grouped_paths_equal_the_reference(case, layout):
    c = dict(CASES[case])
    T, E, k = c.pop("T"), c.pop("E"), c.pop("k")
    bank = _bank(E, transposed=layout == "transposed", bias=layout == "bias", split_gate=layout == "split gate")
    x = torch.randn(T, H)
    idx, w = _routing(T, E, k, **c)
    ref = reference_dispatch(x, idx, w, E, lambda e, rows: bank_expert(bank, e, rows))
    plan = plan_dispatch(idx, E)
    loop = dispatch_combine(x, idx, w, E, lambda e, rows: bank_expert(bank, e, rows), plan=plan)
    for out in (loop, bank_grouped(bank, x, plan, w), bank_dispatch(bank, x, idx, w)):
        assert out.shape == (T, H)
        if T:
            assert rel_diff(out, ref) < 1e-5


def test_input_weighting_applies_the_routing_weight_before_the_expert():
    bank = _bank(6, transposed=True)
    x, (idx, w) = torch.randn(25, H), _routing(25, 6, 2)
    ref = reference_dispatch(x, idx, w, 6, lambda e, r: bank_expert(bank, e, r), weight_inputs=True)
    plan = plan_dispatch(idx, 6)
    assert rel_diff(bank_grouped(bank, x, plan, w, weight_inputs=True), ref) < 1e-5
    assert (
        rel_diff(dispatch_combine(x, idx, w, 6, lambda e, r: bank_expert(bank, e, r), weight_inputs=True), ref) < 1e-5
    )
    # ... and that is a different function from weighting the output
    out_weighted = reference_dispatch(x, idx, w, 6, lambda e, r: bank_expert(bank, e, r))
    assert rel_diff(out_weighted, ref) > 1e-3


def test_dropped_slots_contribute_nothing():
    """Indices >= num_experts are sentinels (capacity-dropped slots): sorted past every expert."""
    E, bank = 4, _bank(4)
    x = torch.randn(10, H)
    idx, w = _routing(10, E, 2)
    idx[::3, 1] = E
    plan = plan_dispatch(idx, E)
    assert plan.offsets[-1] == idx.numel() - int((idx == E).sum())
    ref = reference_dispatch(x, idx, w, E, lambda e, r: bank_expert(bank, e, r))
    assert rel_diff(bank_grouped(bank, x, plan, w), ref) < 1e-5
    assert rel_diff(dispatch_combine(x, idx, w, E, lambda e, r: bank_expert(bank, e, r), plan=plan), ref) < 1e-5


def test_plan_sorts_slots_by_expert_and_counts_them():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    plan = plan_dispatch(idx, 4)
    assert plan.counts.tolist() == [2, 1, 3, 0]
    assert plan.offsets == [0, 2, 3, 6, 6]
    assert plan.active == [0, 1, 2]
    assert idx.reshape(-1)[plan.order].tolist() == [0, 0, 1, 2, 2, 2]
    assert plan.token_ids.tolist() == (plan.order // 2).tolist()


def test_gradients_flow_through_the_loop_path_like_the_reference():
    bank = _bank(5)
    up = bank.up.clone().requires_grad_()
    bank = ExpertBank(up=up, down=bank.down, activate=bank.activate)
    x = torch.randn(7, H, requires_grad=True)
    idx, w = _routing(7, 5, 2)
    w.requires_grad_()
    out = bank_dispatch(bank, x, idx, w)  # grad enabled: the autograd-safe loop is used
    ref = reference_dispatch(x, idx, w, 5, lambda e, r: bank_expert(bank, e, r))
    g_out = torch.autograd.grad(out.sum(), (x, w, up))
    g_ref = torch.autograd.grad(ref.sum(), (x, w, up))
    for a, b in zip(g_out, g_ref):
        assert rel_diff(a, b) < 1e-5


@pytest.mark.parametrize("crossover, fp32", [(16.0, True), (float("inf"), False)])
def test_cpu_half_precision_experts_upcast_exactly_where_calibration_says(monkeypatch, crossover, fp32):
    """Whether bf16 experts run in fp32 (faster on CPUs without native bf16, and closer to the fp32
    reference) or as one grouped bf16 GEMM is the measured crossover of this machine, never a constant."""
    from moe_patch.dispatch import calibration
    from moe_patch.dispatch import experts as experts_mod

    monkeypatch.setattr(calibration, "upcast_min_rows", lambda dtype: crossover)
    monkeypatch.setattr(experts_mod, "_loop_wins", lambda *a: False)
    grouped = []
    real_grouped = experts_mod.bank_grouped
    monkeypatch.setattr(experts_mod, "bank_grouped", lambda *a, **k: grouped.append(1) or real_grouped(*a, **k))
    bank32 = _bank(4)
    bank16 = ExpertBank(up=bank32.up.bfloat16(), down=bank32.down.bfloat16(), activate=bank32.activate)
    x = torch.randn(64, H)
    idx, w = _routing(64, 4, 2)  # 32 rows per expert
    with torch.inference_mode():
        out = bank_dispatch(bank16, x.bfloat16(), idx, w.bfloat16())
    assert out.dtype == torch.bfloat16
    assert bool(grouped) is not fp32
    ref = reference_dispatch(x, idx, w, 4, lambda e, r: bank_expert(bank16, e, r, torch.float32))
    assert rel_diff(out, ref) < (1e-2 if fp32 else 3e-2)


def test_expert_parallel_sentinels_pass_validation():
    from moe_patch.validation import check_routing

    class Experts(torch.nn.Module):
        num_experts = 4
        _is_expert_parallel = True

    check_routing(Experts(), torch.tensor([[0, 4]]), torch.tensor([[0.5, 0.0]]))  # id 4 = sentinel, no error


def test_experts_computed_in_any_order_sum_to_the_bitwise_same_output():
    """The offload engine computes cached experts first; the sum must not depend on that order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g)
    idx = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(6)])
    w = torch.rand(6, 3, generator=g)
    mats = torch.randn(5, 16, 16, generator=g)

    def fn(e, rows):
        return rows @ mats[e]

    plan = plan_dispatch(idx, 5)
    ref = dispatch_combine(x, idx, w, 5, fn, plan=plan)
    for order in (plan.active[::-1], plan.active[1:] + plan.active[:1]):
        assert torch.equal(dispatch_combine(x, idx, w, 5, fn, plan=plan, order=order), ref)


def test_calibrations_are_measured_once_per_machine_and_kept(tmp_path):
    """What is fastest is measured on the running machine, once, and kept for later processes."""
    from moe_patch.dispatch.calibration import Calibrations

    calls = []
    cache = Calibrations(tmp_path)
    assert cache.get("question", lambda: calls.append(1) or 3.0) == 3.0
    assert cache.get("question", lambda: calls.append(1) or 4.0) == 3.0 and calls == [1]
    assert Calibrations(tmp_path).get("question", lambda: 5.0) == 3.0  # a later process, same machine
    assert len(list(tmp_path.glob("calibration-*.json"))) == 1


def test_kernel_crossovers_come_from_measurements_on_this_machine():
    import math

    from moe_patch.dispatch.calibration import CALIBRATIONS, loop_wins, upcast_min_rows

    assert upcast_min_rows(torch.float32) == math.inf  # only half precision can gain from an fp32 upcast
    assert upcast_min_rows(torch.bfloat16) in (1.0, 4.0, 16.0, 64.0, 256.0, math.inf)
    assert isinstance(loop_wins(torch.float32, 3), bool)
    bits = int(CALIBRATIONS.get("cpu_loop_wins/float32", lambda: -1.0))  # measured by the call above
    assert 0 <= bits < 32 and loop_wins(torch.float32, 1) == bool(bits & 1)


def test_a_gpu_older_than_sm80_runs_the_loop_and_says_so_once(monkeypatch, caplog):
    """torch's grouped GEMM needs SM80+ (Ampere): older GPUs compute experts in a loop, and the log says it once."""
    import logging
    from types import SimpleNamespace

    from moe_patch.dispatch import core

    core._say_no_grouped_kernel.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    weight = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="moe_patch.dispatch.core"):
        assert not any(core.grouped_mm_supported(torch.zeros(4, 8), [weight]) for _ in range(3))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "compute capability 7.5" in said[0] and "SM80+" in said[0] and "loop" in said[0]


def test_a_kept_calibration_is_not_decided_by_a_busy_moment():
    """Calibrations are kept per machine, so each contender's time is its best round, rounds alternate, and a
    stall during one contender's round does not make it lose."""
    import time

    from moe_patch.timing import best_seconds

    calls = {"n": 0}

    def fast_but_stalled_once():
        calls["n"] += 1
        time.sleep(0.2 if calls["n"] == 2 else 0.002)  # another job takes the CPU during one round

    fast, slow = best_seconds(fast_but_stalled_once, lambda: time.sleep(0.02), repeats=3)
    assert fast < slow and fast < 0.1
    assert calls["n"] == 4  # one warm-up call, then one per round
