"""Offload building blocks in isolation: budgets, cache policies, cost model, statistics, quantization."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_patch.errors import BudgetError
from moe_patch.formats import FORMATS, materialize, nbytes_of, tensors_of
from moe_patch.offload.budget import check_budget, format_bytes, parse_bytes
from moe_patch.offload.cache import TierCache
from moe_patch.offload.costmodel import Bandwidths, expert_flops_per_row, prefer_cpu
from moe_patch.offload.stats import LayerStats, OffloadStats, bandwidth_bound_s, coefficient_of_variation


@pytest.mark.parametrize(
    "text,expected",
    [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5 KiB", 1536), ("4096", 4096), (123, 123), ("2g", 2 * 2**30)],
)
def test_parse_bytes_reads_binary_and_decimal_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "GiB", "-3", -1, True])
def test_parse_bytes_rejects_nonsense_with_the_field_name(bad):
    with pytest.raises(BudgetError, match="expert_cache"):
        parse_bytes(bad, name="expert_cache")


def test_budget_below_one_expert_names_the_minimum():
    with pytest.raises(BudgetError) as err:
        check_budget(1000, 4096, name="expert_cache", allow_zero=False)
    assert "4096 bytes" in str(err.value) and "expert_cache" in str(err.value)
    check_budget(0, 4096, name="host_cache", allow_zero=True)  # 0 switches the host tier off
    with pytest.raises(BudgetError):
        check_budget(0, 4096, name="expert_cache", allow_zero=False)
    assert format_bytes(3 * 2**30) == "3.00 GiB"  # the package's one formatter (moe_patch.sizes)


def test_lru_evicts_least_recently_used_and_never_exceeds_budget():
    c = TierCache(300, "lru")
    for k in range(3):
        c.put((0, k), k, 100)
    c.get((0, 0))  # 0 is now the most recent
    stored, evicted = c.put((0, 3), 3, 100)
    assert stored and [k for k, _ in evicted] == [(0, 1)]
    assert c.used == 300 and c.peak <= 300


def test_lfu_keeps_frequent_entries():
    c = TierCache(200, "lfu")
    c.put((0, 0), "a", 100)
    c.put((0, 1), "b", 100)
    for _ in range(3):
        c.get((0, 1))
    _, evicted = c.put((0, 2), "c", 100)
    assert [k for k, _ in evicted] == [(0, 0)]


def test_pinned_hot_evicts_cold_entries_first():
    c = TierCache(200, "pinned-hot", hot=[(0, 0)])
    c.put((0, 0), "hot", 100)
    c.put((0, 1), "cold", 100)
    c.get((0, 0))
    c.get((0, 1))  # the hot entry is now the least recent, yet it stays
    _, evicted = c.put((0, 2), "new", 100)
    assert [k for k, _ in evicted] == [(0, 1)]


def test_pinned_entries_block_eviction_and_inserts_are_refused_not_forced():
    c = TierCache(200, "lru")
    c.put((0, 0), "a", 100)
    c.put((0, 1), "b", 100)
    c.pin((0, 0))
    c.pin((0, 1))
    assert c.put((0, 2), "c", 100) == (False, [])
    assert c.used == 200 and (0, 2) not in c
    c.unpin((0, 1))
    stored, evicted = c.put((0, 2), "c", 100)
    assert stored and [k for k, _ in evicted] == [(0, 1)]
    assert c.put((0, 3), "too big", 500) == (False, [])


def test_cost_model_prefers_cpu_for_one_row_and_the_copy_for_many():
    # a desktop: dual-channel DDR5, PCIe 4.0 x16 as measured with pinned memory
    bw = Bandwidths(dram=40e9, cpu_flops=60e9, h2d=12e9, device_flops=100e12)
    shapes = {"gate_up_proj": (1536, 2048), "down_proj": (2048, 768)}
    flops = expert_flops_per_row(shapes)
    nbytes = (1536 * 2048 + 2048 * 768) * 2
    assert prefer_cpu(1, nbytes, flops, bw)
    assert not prefer_cpu(4096, nbytes, flops, bw)


def test_cost_model_uses_the_measured_gemv_rate_and_round_trip_not_dram_alone():
    # the H100 host of docs/benchmarks.md: PCIe 5.0 at 52 GB/s; a CPU whose bf16 GEMV streams 5 GB/s
    shapes = {"gate_up_proj": (1536, 2048), "down_proj": (2048, 768)}
    flops, nbytes = expert_flops_per_row(shapes), (1536 * 2048 + 2048 * 768) * 2
    fast_dram = Bandwidths(dram=200e9, cpu_flops=1e12, h2d=52e9, device_flops=500e12)
    assert prefer_cpu(1, nbytes, flops, fast_dram)  # DRAM alone says the CPU wins
    slow_gemv = Bandwidths(dram=200e9, cpu_flops=1e12, h2d=52e9, device_flops=500e12, cpu_gemv=5e9)
    assert not prefer_cpu(1, nbytes, flops, slow_gemv)
    sync_cost = Bandwidths(dram=200e9, cpu_flops=1e12, h2d=52e9, device_flops=500e12, roundtrip_s=2e-4)
    assert not prefer_cpu(1, nbytes, flops, sync_cost)


def test_calibration_measures_the_cpu_in_the_experts_dtype():
    from moe_patch.offload.costmodel import calibrate

    bw = calibrate("cpu", torch.bfloat16)
    assert bw.dram > 0 and bw.cpu_flops > 0 and bw.cpu_gemv > 0
    assert bw.h2d == 0 and bw.roundtrip_s == 0  # no device here


def test_cost_model_without_gpu_never_prefers_a_transfer():
    bw = Bandwidths(dram=20e9, cpu_flops=60e9)  # h2d = 0: there is no device to copy to
    assert prefer_cpu(10_000, 10**9, 10**9, bw)


def test_statistics_derive_rates_cv_and_bound():
    assert coefficient_of_variation([1, 1, 1, 1]) == 0
    assert math.isclose(coefficient_of_variation([0, 2]), 1.0)
    layer = LayerStats(
        num_experts=2, hits={"device": 3, "host": 0, "disk": 1}, predicted=4, predicted_used=3, used_when_predicted=6
    )
    assert layer.hit_rate == 0.75 and layer.precision == 0.75 and layer.recall == 0.5
    assert bandwidth_bound_s({"disk": 2e9, "dram": 1e9}, {"disk": 2e9, "dram": 20e9}) == 1.0
    st = OffloadStats(layers=[layer], bandwidths=Bandwidths(dram=10.0, cpu_flops=1.0))
    st.steps["decode"], st.seconds["decode"] = 2, 4.0
    st.bytes_read["decode"].update(device=20, disk=20)
    st.disk_read_s, st.disk_bytes_total = 1.0, 5
    # per step: disk 10 B at 5 B/s = 2 s; DRAM 20 B at 10 B/s = 2 s -> bound 2 s of an achieved 2 s
    assert st.decode_bound_s() == 2.0 and st.fraction_of_bound == 1.0
    assert "layer" in str(st)


@pytest.mark.parametrize("kind,tol", [("int8", 0.02), ("nf4", 0.25)])
def test_quantized_experts_round_trip_within_format_error_and_shrink(kind, tol):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    q = FORMATS[kind].encode(w)
    back = materialize(q)
    assert back.shape == w.shape and back.dtype == w.dtype
    assert (back - w).abs().max() / w.abs().max() < tol
    assert nbytes_of(q) < w.numel() * w.element_size() / (3 if kind == "int8" else 6)
    bias = torch.randn(64)
    assert FORMATS[kind].encode(bias) is bias  # vectors stay in full precision
    moved = q.to("cpu")  # the device copy the caches make; the original must survive it
    assert torch.equal(materialize(moved), back) and torch.equal(materialize(q), back)


def test_pool_slots_return_when_their_entry_dies():
    import gc

    from moe_patch.offload.pool import SlotPool

    pool = SlotPool(slot_bytes=1024, slots=2)
    a, b = pool.take(), pool.take()
    assert pool.take() is None and pool.free == 0
    view = a.tensor((4, 8), torch.float32)
    view.fill_(1.0)
    assert view.data_ptr() != b.tensor((4, 8), torch.float32).data_ptr()  # slots never overlap
    with pytest.raises(ValueError):
        a.tensor((1024,), torch.float32)  # more than the slot holds
    del a
    gc.collect()
    assert pool.free == 1 and pool.take() is not None


def test_prefetch_ranks_experts_by_predicted_rows_and_drops_unused():
    from moe_patch.offload.prefetch import most_used

    assert most_used([0, 5, 2, 5, 0, 1], 3) == [1, 3, 2]  # ties keep the lower index first
    assert most_used([0, 0, 3], 5) == [2]  # experts no row chose are never prefetched


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts tensor-to-Python conversions: on a GPU each one is a device sync."""

    SYNCING = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _conversions_per_decode_step(tmp_path, top_k: int) -> int:
    import moe_patch
    from tests.helpers.offload import expert_bytes, prompts, save_tiny

    path = save_tiny("qwen3_moe", tmp_path / f"q{top_k}")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts_per_tok"] = top_k
    (path / "config.json").write_text(json.dumps(cfg))
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=16 * expert_bytes("qwen3_moe"))
    ids = prompts(4)  # four rows: top_k x 4 routed slots per layer
    with torch.no_grad():
        out = model(ids, use_cache=True)
        step = out.logits[:, -1:].argmax(-1)
        model(step, past_key_values=out.past_key_values, use_cache=True)  # every expert cached now
        counter = _HostReads()
        with counter:
            model(step, past_key_values=out.past_key_values, use_cache=True)
    return counter.count


@pytest.mark.parametrize("slots", ["device", "cpu kernels"])
def test_an_offloaded_decode_step_reads_back_a_constant_few_times_per_layer(tmp_path, slots, monkeypatch):
    """A guard for the GPU path, checked on CPU: Python-level reads of tensors (a device sync each on a GPU)
    per decode step must not grow with the number of active experts (once 128 per layer on an H100, most of
    the step): the routing check, the layer's one transfer, its bookkeeping and the dispatch plan. A GPU has no
    CPU kernel over its slots (emulated by taking it away); on a CPU the kernels' path reads CPU tensors, which
    syncs nothing, but it must not grow with the active experts either."""
    from moe_patch.offload.slot_kernels import SlotKernels

    if slots == "device":
        monkeypatch.setattr(SlotKernels, "get", lambda self, layer, group: None)
    two, eight = _conversions_per_decode_step(tmp_path, 2), _conversions_per_decode_step(tmp_path, 8)
    layers = 2
    assert two == eight, (two, eight)  # 8 vs 2 experts per token (about 8 vs 6 active per layer)
    # + 1: the last layer's output check, read at the step's end after the synchronize the step timing makes
    # anyway (every other layer's check rides on the next layer's one transfer)
    if slots == "device":
        assert eight <= 4 * layers + 1, eight


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_every_tensor_behind_a_quantized_expert_is_listed_for_stream_bookkeeping(kind):
    q = FORMATS[kind].encode(torch.randn(64, 128))
    parts = tensors_of(q)
    assert all(isinstance(t, torch.Tensor) for t in parts)
    assert any(t is q.tensors[0] for t in parts) and sum(t.numel() * t.element_size() for t in parts) >= q.nbytes
    plain = torch.randn(4)
    assert tensors_of(plain) == [plain]


def test_the_decode_bound_counts_every_byte_a_step_moves_on_its_own_resource():
    """docs/offload.md: the busiest resource's time, each resource at its own measured rate."""
    bw = Bandwidths(dram=20e9, cpu_flops=1e11, cpu_gemv=10e9, disk=1e9)
    cpu = OffloadStats(layers=[LayerStats(4)], device="cpu", bandwidths=bw, non_expert_bytes=int(0.5e9))
    cpu.steps["decode"] = 2
    cpu.bytes_read["decode"] = {"device": int(1e9), "host": 0, "disk": int(0.2e9)}
    times = cpu.decode_bound_by_resource()
    # per step: 0.5 GB non-expert + 0.6 GB of experts computed, at DRAM speed; 0.1 GB from disk
    assert times == pytest.approx({"memory": 1.1e9 / 20e9, "disk": 0.1e9 / 1e9})
    assert cpu.decode_bound_s() == pytest.approx(0.1) and cpu.binding_resource == "disk"
    cpu.seconds["decode"] = 2 * 0.1
    assert cpu.fraction_of_bound == pytest.approx(1.0)  # running at the bound is 100%: the bound can be reached

    gpu_bw = Bandwidths(dram=20e9, cpu_flops=1e11, cpu_gemv=10e9, h2d=25e9, device_mem=2e12, disk=2e9)
    gpu = OffloadStats(layers=[LayerStats(4)], device="cuda", bandwidths=gpu_bw, non_expert_bytes=int(2e9))
    gpu.steps["decode"] = 1
    gpu.bytes_read["decode"] = {"device": int(4e9), "host": int(1e9), "disk": int(0.5e9)}
    gpu.cpu_bytes["decode"] = int(0.5e9)  # computed on the CPU where it lay, not copied
    times = gpu.decode_bound_by_resource()
    assert times == pytest.approx({"memory": 7e9 / 2e12, "pcie": 1e9 / 25e9, "cpu": 0.5e9 / 20e9, "disk": 0.25})
    assert gpu.binding_resource == "disk"


def test_cpu_compute_dtype_weighs_gemv_speed_against_capacity():
    from moe_patch.offload.costmodel import choose_compute_dtype

    mib = 2**20
    # everything fits in fp32 and a bf16 GEMV is 6x slower (AVX2-only CPU): fp32 slots
    assert choose_compute_dtype(None, 64, mib, half_s=6e-3, fp32_s=2e-3, miss_s=1e-3) == "fp32"
    # native bf16 (AVX512_BF16/AMX): keep the model's dtype, twice the experts per byte
    assert choose_compute_dtype(None, 64, mib, half_s=1e-3, fp32_s=2e-3, miss_s=1e-3) == "half"
    # a tight budget where misses from disk dominate: capacity wins
    assert choose_compute_dtype(8 * mib, 64, mib, half_s=3e-3, fp32_s=2e-3, miss_s=50e-3) == "half"
    assert choose_compute_dtype(mib, 64, mib, half_s=1.0, fp32_s=0.0, miss_s=0.0) == "half"  # no fp32 slot fits


@pytest.mark.parametrize("fp32_faster", [True, False])
def test_bf16_models_on_cpu_compute_experts_in_the_dtype_measured_faster(tmp_path, monkeypatch, request, fp32_faster):
    import moe_patch
    from moe_patch.offload import get_offload_handle, plan
    from tests.helpers.offload import build, prompts

    def fake(device="cpu", dtype=torch.float32, size_mb=256):  # this CPU's bandwidths, as calibrate measures them
        return Bandwidths(dram=20e9, cpu_flops=1e11, cpu_gemv=8e9)

    def rates(dtype):  # one-row GEMV bytes/s in the model's dtype and in fp32, as gemv_rates measures them
        return (1e9, 8e9) if fp32_faster else (8e9, 1e9)

    monkeypatch.setattr(plan, "calibrate", fake)
    monkeypatch.setattr(plan, "gemv_rates", rates)
    from moe_patch.kernels import KERNELS

    monkeypatch.setenv("MOE_PATCH_KERNELS", "0")  # torch's GEMV rates decide (the CPU kernels: tests/kernels)
    KERNELS.reset()
    request.addfinalizer(KERNELS.reset)
    path = tmp_path / "bf16"
    build("qwen3_moe").to(torch.bfloat16).save_pretrained(path)
    import transformers

    resident = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    model = moe_patch.load_model(path, dtype=torch.bfloat16)
    handle = get_offload_handle(model)
    with torch.no_grad():
        got, want = model(prompts(2)).logits.float(), resident(prompts(2)).logits.float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2  # bf16 tolerance
    engine = handle.engine
    if fp32_faster:
        assert handle.stats.compute_dtype == "float32" and engine.dev.groups[0].slab.dtype == torch.float32
    else:
        assert handle.stats.compute_dtype is None and engine.dev.groups[0].slab.dtype == torch.bfloat16


@pytest.mark.parametrize("policy", ["lru", "lfu", "pinned-hot"])
def test_both_tiers_choose_the_same_victim_under_one_policy(policy):
    """The host tier (a byte budget over an ordered dict) and the device slots (tensors) score with the
    same EvictionPolicy: the same history gives the same victim."""
    from moe_patch.offload.slab import SlotTable

    host = TierCache(300, policy, hot=[(0, 0)])
    slots = SlotTable([0], 8, 3, 100, policy=policy, hot=[(0, 0)])
    for e in range(3):
        host.put((0, e), e, 100)
        slots.assign(slots.victim((0, e)), (0, e))
    for e in (0, 2, 2, 0, 1):  # uses after insertion: expert 1 is the most recent, 0 and 2 are used more
        host.get((0, e))
        slots.touch(0, torch.tensor([e]), torch.tensor([slots.slot((0, e))]))
    _, evicted = host.put((0, 3), 3, 100)
    victim = slots.owner[slots.victim()].tolist()
    assert [k for k, _ in evicted] == [tuple(victim)]
    assert tuple(victim) == {"lru": (0, 2), "lfu": (0, 1), "pinned-hot": (0, 2)}[policy]
