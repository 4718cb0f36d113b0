"""A decode step's dense linears through the kernels' GEMV: :class:`LinearKernel` against a float64 matmul, and
``patch_model`` / the CPU offload engine giving each plain CPU ``nn.Linear`` a forward that takes the kernel at the
row counts measured faster here and torch's ``F.linear`` otherwise (autograd, autocast, compile, more rows). The
module, its parameters and state_dict are untouched; unpatch and detach restore the forward; copies derive their own
kernel; fp32 generates the stock tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_patch
from moe_patch import dense_linears, patch_model, unpatch_model
from moe_patch.errors import InvalidArgumentError
from moe_patch.kernels import KERNELS, KernelUnavailableError
from moe_patch.kernels import crossover as kcrossover
from moe_patch.kernels.crossover import CROSSOVERS, LINEAR_BYTES, LINEAR_ROWS
from moe_patch.kernels.linear import LinearKernel
from moe_patch.offload import get_offload_handle
from moe_patch.patch import is_patched
from moe_patch.testing.compare import rel_diff
from tests.helpers.offload import build as build_offload
from tests.helpers.offload import greedy, prompts
from tests.patch.patch_helpers import build, copied, logits

#: output bound against float64 (relative to the largest output): one bf16 / fp16 rounding, or fp32 sums
BOUND = {torch.bfloat16: 2**-8, torch.float16: 2**-10, torch.float32: 1e-6}


def _reference(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_f, in_f", [(1, 1), (3, 7), (100, 33), (257, 2880), (64, 4097)])
@pytest.mark.parametrize("rows", [1, 2, 5, 9])
def test_the_gemv_matches_a_float64_matmul(dtype, out_f, in_f, rows, kernel_status):
    gen = torch.Generator().manual_seed(out_f * 7 + in_f + rows)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(dtype)
    b = torch.randn(out_f, generator=gen).to(dtype)
    x = torch.randn(rows, in_f, generator=gen).to(dtype)
    for bias in (b, None):
        got = LinearKernel(w, bias)(x)
        want = _reference(x, w, bias)
        assert got.dtype == dtype and got.shape == (rows, out_f)
        assert rel_diff(got.double(), want) <= BOUND[dtype]


def test_leading_dimensions_strided_rows_and_empty_inputs(kernel_status):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=gen).to(torch.bfloat16)
    kernel = LinearKernel(w)
    x = torch.randn(2, 3, 40, generator=gen).to(torch.bfloat16)
    assert kernel(x).shape == (2, 3, 48)
    assert rel_diff(kernel(x).double(), _reference(x.reshape(6, 40), w, None).reshape(2, 3, 48)) <= 2**-8
    wide = torch.randn(4, 100, generator=gen).to(torch.bfloat16)
    assert torch.equal(kernel(wide[:, 10:50]), kernel(wide[:, 10:50].contiguous()))  # rows apart in memory
    assert kernel(x[:0]).shape == (0, 3, 48)
    assert kernel.last_variant in kernel_status.variants


@pytest.mark.parametrize(
    "weight",
    [
        torch.zeros(8, 8, dtype=torch.float64),
        torch.zeros(8, 8, dtype=torch.int32),
        torch.zeros(2, 8, 8),
        torch.zeros(16, 8).t(),  # transposed: no contiguous rows
        torch.zeros(0, 8),
    ],
    ids=["float64", "int32", "3-D", "transposed", "empty"],
)
def test_weights_the_gemv_cannot_read_are_refused(weight, kernel_status):
    with pytest.raises(KernelUnavailableError):
        LinearKernel(weight)


def test_a_mismatched_input_is_one_clear_error(kernel_status):
    kernel = LinearKernel(torch.zeros(8, 16))
    with pytest.raises(InvalidArgumentError, match="x has shape"):
        kernel(torch.zeros(2, 15))


def test_the_measurement_answers_the_largest_row_count_won_at_every_count(monkeypatch, kernel_status):
    answers = iter([(0.5, 1.0), (0.5, 1.0), (0.99, 1.0), (0.1, 1.0)])  # wins at 1 and 2, not at 4: stops there
    monkeypatch.setattr(kcrossover, "best_seconds", lambda *fns, **kw: [fn() for fn in fns] and next(answers))
    assert kcrossover.measure_linear_max_rows(torch.bfloat16) == LINEAR_ROWS[1]
    monkeypatch.setattr(kcrossover, "best_seconds", lambda *fns, **kw: (1.0, 1.0))
    assert kcrossover.measure_linear_max_rows(torch.float32) == 0.0


def test_the_size_floor_is_the_smallest_size_won_there_and_at_every_larger_one(monkeypatch, kernel_status):
    sizes = sorted(LINEAR_BYTES, reverse=True)  # timed largest first: 1 MiB and 256 KiB won, 64 KiB lost
    answers = iter([(0.5, 1.0), (0.5, 1.0), (1.2, 1.0)])
    monkeypatch.setattr(kcrossover, "best_seconds", lambda *fns, **kw: [fn() for fn in fns] and next(answers))
    assert kcrossover.measure_linear_min_bytes(torch.bfloat16) == sizes[1]
    monkeypatch.setattr(kcrossover, "best_seconds", lambda *fns, **kw: (1.0, 1.0))  # never clearly faster
    side = kcrossover.LINEAR_SIDE  # then larger weights are left to the row-count measurement, made at that size
    assert kcrossover.measure_linear_min_bytes(torch.float32) == float(side * side * 4)


def test_a_kept_decision_follows_swapped_data_and_thread_counts(gemv_measured_faster, gemv_calls):
    model, _ = build("qwen3_moe")
    patch_model(model)
    head = model.lm_head
    x = torch.randn(1, head.in_features)
    threads = torch.get_num_threads()
    with torch.no_grad():
        head(x)
        head.weight.data = head.weight.data * 2  # same Parameter, new storage: the kernel must not read the old one
        assert rel_diff(head(x), F.linear(x, head.weight)) < 1e-6
        head.bias = torch.nn.Parameter(torch.ones(head.out_features))
        assert rel_diff(head(x), F.linear(x, head.weight, head.bias)) < 1e-6
        torch.set_num_threads(1)
        try:
            gemv_calls.clear()
            assert rel_diff(head(x), F.linear(x, head.weight, head.bias)) < 1e-6 and gemv_calls
        finally:
            torch.set_num_threads(threads)


def test_a_kept_decision_follows_a_weight_cut_at_the_same_address(gemv_measured_faster, gemv_calls):
    model, _ = build("qwen3_moe")
    patch_model(model)
    linear = next(m for m in model.modules() if dense_linears.is_dense_linear(m) and m.bias is None)
    x = torch.randn(1, linear.in_features)
    with torch.no_grad():
        linear(x)
        linear.weight.data = linear.weight.data[: linear.out_features // 2]  # same address, half the rows
        got = linear(x)
        assert got.shape[-1] == linear.weight.shape[0] and rel_diff(got, F.linear(x, linear.weight)) < 1e-6


def test_a_weight_below_the_measured_floor_stays_with_torch(monkeypatch, kernel_status, gemv_calls):
    monkeypatch.setattr(dense_linears, "MIN_WEIGHT_BYTES", 0)
    model, _ = build("qwen3_moe")
    head = model.lm_head
    nbytes = head.weight.numel() * head.weight.element_size()
    _measured(monkeypatch, 4.0, min_bytes=nbytes + 1)
    patch_model(model)
    x = torch.randn(1, head.in_features)
    with torch.no_grad():
        assert torch.equal(head(x), F.linear(x, head.weight)) and not gemv_calls
    unpatch_model(model)
    _measured(monkeypatch, 4.0, min_bytes=nbytes)
    patch_model(model)
    with torch.no_grad():
        assert rel_diff(head(x), F.linear(x, head.weight)) < 1e-6 and gemv_calls


# ------------------------------------------------------------------ installed on a model


def _measured(monkeypatch, rows, min_bytes=0.0):
    """The GEMV measured faster up to ``rows`` rows on weights of at least ``min_bytes`` (no real measurement)."""
    monkeypatch.setattr(CROSSOVERS, "linear_rows", rows if callable(rows) else lambda dtype: rows)
    monkeypatch.setattr(CROSSOVERS, "linear_min_bytes", lambda dtype: min_bytes)


@pytest.fixture
def gemv_measured_faster(monkeypatch, kernel_status):
    """Every linear counts (tiny models' are far below the size floor) and the GEMV wins up to 4 rows."""
    monkeypatch.setattr(dense_linears, "MIN_WEIGHT_BYTES", 0)
    _measured(monkeypatch, 4.0)


@pytest.fixture
def gemv_calls(monkeypatch):
    calls = []
    original = LinearKernel.__call__
    monkeypatch.setattr(LinearKernel, "__call__", lambda self, x, **kw: calls.append(x.shape) or original(self, x))
    return calls


def _decode_inputs(model, rows=1):
    return {"input_ids": torch.randint(3, model.config.vocab_size, (rows, 1), generator=torch.Generator())}


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_fp32_decode_through_the_gemv_generates_the_stock_tokens(name, gemv_measured_faster, gemv_calls):
    model, inputs = build(name)
    ids = inputs["input_ids"][:1, :4]
    want = logits(model, {"input_ids": ids[:, :1]})
    with torch.no_grad():
        stock = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    report = patch_model(model)
    assert report.dense_linears > 0 and "dense linears decode through the CPU kernel GEMV" in str(report)
    assert rel_diff(logits(model, {"input_ids": ids[:, :1]}), want) < 1e-5
    gemv_calls.clear()
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(got, stock)
    assert gemv_calls and all(s[:-1].numel() <= 4 for s in gemv_calls)  # decode steps; the 4-token prefill too
    assert is_patched(model)


def test_bf16_is_within_one_rounding_of_stock(gemv_measured_faster, gemv_calls):
    model, inputs = build("qwen3_moe", dtype=torch.bfloat16)
    step = _decode_inputs(model)
    want = logits(model, step)
    patch_model(model)
    assert rel_diff(logits(model, step), want) < 2e-2 and gemv_calls


def test_more_rows_than_measured_faster_autograd_and_autocast_take_torch(gemv_measured_faster, gemv_calls):
    model, inputs = build("qwen3_moe")
    want = logits(model, inputs)  # 12 tokens per row: above the 4 rows the GEMV is measured faster at
    patch_model(model)
    assert rel_diff(logits(model, inputs), want) < 1e-5 and not gemv_calls
    step = _decode_inputs(model)
    model(**step).logits.sum().backward()  # grad enabled, parameters require grad
    assert not gemv_calls and model.lm_head.weight.grad is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**step)
    assert not gemv_calls


def test_compiled_graphs_take_torch_and_match(gemv_measured_faster, gemv_calls):
    model, _ = build("qwen3_moe")
    step = _decode_inputs(model)
    want = logits(model, step)
    patch_model(model)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    gemv_calls.clear()
    with torch.no_grad():
        got = compiled(**step).logits
    assert rel_diff(got, want) < 1e-5 and not gemv_calls


def test_unpatch_restores_the_stock_forward_and_state_dict_is_untouched(gemv_measured_faster, gemv_calls):
    model, _ = build("qwen3_moe")
    keys = list(model.state_dict())
    step = _decode_inputs(model)
    want = logits(model, step)
    patch_model(model)
    logits(model, step)
    assert list(model.state_dict()) == keys
    changed = [m for m in model.modules() if dense_linears.is_dense_linear(m)]
    assert changed and model.lm_head in changed
    assert unpatch_model(model)
    assert not any(dense_linears.is_dense_linear(m) or "forward" in m.__dict__ for m in changed)
    assert not any(k.startswith("_moe_patch") for m in changed for k in m.__dict__)
    gemv_calls.clear()
    assert torch.equal(logits(model, step), want) and not gemv_calls


def test_is_patched_follows_the_experts_not_the_dense_linears(gemv_measured_faster):
    model, _ = build("qwen3_moe")
    patch_model(model)
    model.set_experts_implementation("eager")  # every block handed to transformers' own forward
    assert not is_patched(model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_after_a_forward_derives_its_own_gemv(how, gemv_measured_faster, gemv_calls):
    model, _ = build("qwen3_moe")
    step = _decode_inputs(model)
    patch_model(model)
    want = logits(model, step)
    twin = copied(model, how)
    gemv_calls.clear()
    assert torch.equal(logits(twin, step), want) and gemv_calls
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)  # the copy's own weights, not the original's
    assert not torch.equal(logits(twin, step), want)
    assert torch.equal(logits(model, step), want)


def test_weights_that_move_rebuild_and_small_weights_stay_with_torch(monkeypatch, kernel_status, gemv_calls):
    _measured(monkeypatch, 4.0)
    model, _ = build("qwen3_moe")
    patch_model(model)
    assert not any(dense_linears.is_dense_linear(m) for m in model.modules())  # all below the 64 KiB floor
    unpatch_model(model)
    monkeypatch.setattr(dense_linears, "MIN_WEIGHT_BYTES", 0)
    patch_model(model)
    step = _decode_inputs(model)
    logits(model, step)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
    with torch.no_grad():
        want = F.linear(model.model(**step).last_hidden_state, model.lm_head.weight)
    assert rel_diff(logits(model, step), want) < 1e-5


def test_measured_slower_or_kernels_off_changes_nothing(monkeypatch, kernel_status, gemv_calls):
    monkeypatch.setattr(dense_linears, "MIN_WEIGHT_BYTES", 0)
    _measured(monkeypatch, 0.0)
    model, _ = build("qwen3_moe")
    step = _decode_inputs(model)
    want = logits(model, step)
    patch_model(model)
    assert rel_diff(logits(model, step), want) < 1e-5 and not gemv_calls  # measured slower: F.linear
    unpatch_model(model)
    _measured(monkeypatch, 4.0)
    monkeypatch.setenv("MOE_PATCH_KERNELS", "0")
    KERNELS.reset()
    try:
        assert patch_model(model).dense_linears == 0
    finally:
        monkeypatch.undo()
        KERNELS.reset()


def test_the_cpu_engine_decodes_its_dense_linears_through_the_gemv(tmp_path, gemv_measured_faster, gemv_calls):
    import transformers

    path = tmp_path / "qwen3"
    build_offload("qwen3_moe").save_pretrained(path)
    resident = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stock = greedy(resident, prompts(1), 24)
    assert not gemv_calls
    model = moe_patch.load_model(path, dtype=torch.float32)
    assert dense_linears.is_dense_linear(model.lm_head)
    gemv_calls.clear()
    assert torch.equal(greedy(model, prompts(1), 24), stock) and gemv_calls
    get_offload_handle(model).detach()
    assert not any(dense_linears.is_dense_linear(m) for m in model.modules())


# ------------------------------------------------------------------ what stock nn.Linear does, the patched one does


def test_what_the_gemv_cannot_take_goes_to_torch_as_stock_would(gemv_measured_faster, gemv_calls):
    """Another dtype after patching, a bias of another dtype (torch's error), keyword calls, tracing and functorch
    transforms (the kernel writes through raw pointers: a trace would record an empty tensor, vmap has no storage)."""
    model, _ = build("qwen3_moe")
    patch_model(model)
    head = model.lm_head
    x = torch.randn(1, head.in_features)
    with torch.no_grad():
        assert torch.equal(head(input=x), head(x)) and gemv_calls  # nn.Linear's own argument name
        traced = torch.jit.trace(head, x)  # its check_trace reruns the module eagerly: the kernel may run there
        gemv_calls.clear()
        other = torch.randn(1, head.in_features)
        assert rel_diff(traced(other), F.linear(other, head.weight)) < 1e-6  # the graph recorded F.linear
        assert rel_diff(torch.func.vmap(head)(x.unsqueeze(0))[0], F.linear(x, head.weight)) < 1e-6
        assert not gemv_calls
        with torch.autograd.forward_ad.dual_level():  # forward-mode AD: the tangent must come through
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            tangent = torch.autograd.forward_ad.unpack_dual(head(dual)).tangent
        assert tangent is not None and rel_diff(tangent, F.linear(torch.ones_like(x), head.weight)) < 1e-6
        assert not gemv_calls
        expanded = x.expand(3, -1)  # rows at stride 0: the kernel gets a contiguous copy
        assert rel_diff(head(expanded), F.linear(expanded, head.weight, head.bias)) < 1e-6 and gemv_calls
        gemv_calls.clear()
        model.double()  # a dtype the kernels do not read: torch's path, no measurement, no error
        assert rel_diff(head(x.double()), F.linear(x.double(), head.weight)) < 1e-12 and not gemv_calls
    model.float()
    linear = next(m for m in model.modules() if dense_linears.is_dense_linear(m) and m.bias is None)
    linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=torch.float64), requires_grad=False)
    with torch.no_grad(), pytest.raises(RuntimeError):  # as F.linear refuses mixed dtypes
        linear(torch.randn(1, linear.in_features))


def test_a_module_that_leaves_the_cpu_drops_its_kernel(gemv_measured_faster, gemv_calls):
    model, _ = build("qwen3_moe")
    patch_model(model)
    head = model.lm_head
    with torch.no_grad():
        head(torch.randn(1, head.in_features))
        assert dense_linears._KERNEL_ATTR in head.__dict__
        head.to("meta")  # any device other than the CPU: the kernel would keep the old CPU weight alive
        assert head(torch.randn(1, head.in_features, device="meta")).is_meta
    assert dense_linears._KERNEL_ATTR not in head.__dict__


def test_training_never_measures_nor_runs_the_gemv(monkeypatch, kernel_status, gemv_calls):
    asked = []
    monkeypatch.setattr(dense_linears, "MIN_WEIGHT_BYTES", 0)
    _measured(monkeypatch, lambda dtype: asked.append(dtype) or 4.0)
    model, _ = build("qwen3_moe")
    assert patch_model(model).dense_linears > 0 and not asked  # installing measures nothing
    model.train()
    model(**_decode_inputs(model)).logits.sum().backward()
    assert not asked and not gemv_calls


def test_a_failed_measurement_leaves_torch_and_patches_the_rest(monkeypatch, kernel_status, caplog):
    def broken(dtype):
        raise RuntimeError("no memory for the measurement")

    monkeypatch.setattr(dense_linears, "MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(CROSSOVERS, "linear_rows", broken)
    monkeypatch.setattr(CROSSOVERS, "linear_min_bytes", broken)
    monkeypatch.setattr(dense_linears, "_FAILED", set())
    model, inputs = build("qwen3_moe")
    step = _decode_inputs(model)
    want = logits(model, step)
    report = patch_model(model)
    assert report.patched
    assert rel_diff(logits(model, step), want) < 1e-5  # the first call that could take the kernel measures it
    assert "measuring the kernel GEMV failed" in caplog.text


def test_the_gemv_under_a_default_device_still_computes_on_the_cpu(kernel_status):
    w = torch.randn(16, 32)
    kernel = LinearKernel(w)
    x = torch.randn(2, 32)
    with torch.device("meta"):
        got = kernel(x)
    assert got.device.type == "cpu" and rel_diff(got.double(), _reference(x, w, None)) <= 1e-6


def test_unpatch_keeps_a_wrapper_another_library_put_around_the_forward(gemv_measured_faster, gemv_calls, caplog):
    """accelerate's hooks wrap a module's forward and keep the one they found inside: putting the pre-patch forward
    back would strip their wrapper (and its device placement). The wrapper stays, ours inside it computes
    nn.Linear's own forward from then on, and a warning says so."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model, _ = build("qwen3_moe")
    step = _decode_inputs(model)
    want = logits(model, step)
    patch_model(model)
    seen = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            seen.append(1)
            return args, kwargs

    add_hook_to_module(model.lm_head, Count())
    assert unpatch_model(model)
    assert "forward was wrapped after moe-patch" in caplog.text
    gemv_calls.clear()
    assert torch.equal(logits(model, step), want) and seen  # their hook still runs, the numbers are stock
    assert not gemv_calls
    assert not dense_linears.is_dense_linear(model.lm_head)
    remove_hook_from_module(model.lm_head)
    assert torch.equal(logits(model, step), want)
