"""The layer call: routing (skipped, repeated and detached experts), Llama 4's weighted inputs, the two
halves for families with their own gate, accumulation, dtypes and strides, threads, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_patch.errors import InvalidArgumentError
from moe_patch.kernels import ExpertFormat, ExpertWeights, KernelUnavailableError, MoEKernel, MoELayerSpec, Workspace
from tests.kernels.kernel_reference import expert_weights, make_experts, reference, rel_err
from tests.kernels.test_kernel_formats import TOL, build, routing

MX = ExpertFormat("mxfp4")
MX_BIAS = ExpertFormat("mxfp4", bias=torch.bfloat16)
GPT_OSS = MoELayerSpec(4, 64, 96, MX_BIAS, MX_BIAS, activation="gpt_oss", glu_layout="interleaved")


@pytest.fixture
def layer_case(kernel_status, gen):
    spec = MoELayerSpec(5, 64, 32, ExpertFormat("bf16"), ExpertFormat("bf16"))
    experts = make_experts(spec, gen)
    return spec, experts, build(spec, experts)


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=str)
def test_skipped_repeated_and_detached_experts(compute, kernel_status, gen):
    """Ids outside [0, E) and detached experts are left to the caller; a repeated expert counts twice."""
    spec = MoELayerSpec(5, 64, 32, MX, MX)
    experts = make_experts(spec, gen)
    layer = build(spec, experts)
    layer.set_expert(3, None)
    experts[3] = None
    idx = torch.tensor([[0, 0, 1], [-1, 2, 5], [3, 4, 99], [3, 3, 3], [4, 1, -7]])
    wts = torch.rand(5, 3, generator=gen)
    x = torch.randn(5, 64, generator=gen).to(compute)
    out = layer.forward(x, idx, wts, torch.zeros(5, 64))
    assert rel_err(out, reference(spec, experts, x, idx, wts, compute)) <= TOL[compute]
    assert torch.equal(out[3], torch.zeros(64))  # only the detached expert: nothing computed


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=str)
def test_weight_inputs_scales_the_expert_input(compute, kernel_status, gen):
    """Llama 4: the routing weight multiplies the expert's input (rounded in the model dtype), not its output."""
    spec = MoELayerSpec(4, 64, 48, ExpertFormat("bf16"), ExpertFormat("bf16"))
    experts = make_experts(spec, gen)
    layer = build(spec, experts)
    idx, wts = routing(6, 1, 4, gen)
    x = torch.randn(6, 64, generator=gen).to(compute)
    out = layer.forward(x, idx, wts.to(compute), torch.zeros(6, 64), weight_inputs=True)
    assert rel_err(out, reference(spec, experts, x, idx, wts.to(compute), compute, weight_inputs=True)) <= TOL[compute]


@pytest.mark.parametrize(
    "activation,layout",
    [("gpt_oss", "interleaved"), ("silu", "interleaved"), ("gelu_tanh", "halves"), ("gpt_oss", "halves")],
)
def test_activations_layouts_and_biases(activation, layout, kernel_status, gen):
    spec = MoELayerSpec(
        4,
        64,
        96,
        ExpertFormat("mxfp4", bias=torch.bfloat16),
        ExpertFormat("mxfp4", bias=torch.float32),
        activation=activation,
        glu_layout=layout,
        alpha=1.702,
        limit=7.0,
    )
    experts = make_experts(spec, gen)
    layer = build(spec, experts)
    idx, wts = routing(9, 2, 4, gen)
    for compute in (torch.bfloat16, torch.float32):
        x = (torch.randn(9, 64, generator=gen) * 3).to(compute)  # large enough to reach the clamps
        out = layer.forward(x, idx, wts, torch.zeros(9, 64))
        assert rel_err(out, reference(spec, experts, x, idx, wts, compute)) <= TOL[compute]


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=str)
def test_the_two_halves_with_an_activation_in_torch(compute, kernel_status, gen):
    """gate_up -> any activation in torch -> down (families with their own _apply_gate) equals the fused call
    for a known activation, and each half equals the reference."""
    spec = GPT_OSS
    experts = make_experts(spec, gen)
    layer = build(spec, experts)
    idx, wts = routing(7, 2, 4, gen)
    idx[0, 1] = -1  # a skipped slot keeps the caller's values
    x = torch.randn(7, 64, generator=gen).to(compute)
    h = layer.gate_up(x, idx, torch.full((14, 192), 7.0))
    ref_h = reference(spec, experts, x, idx, wts, compute, stage="gate_up")
    keep = idx.reshape(-1) >= 0
    assert rel_err(h[keep], ref_h[keep]) <= TOL[compute]
    assert torch.equal(h[1], torch.full((192,), 7.0))
    gate, up = h[:, 0::2].clamp(max=7.0), h[:, 1::2].clamp(-7.0, 7.0)
    a = ((up + 1) * gate * torch.sigmoid(gate * 1.702)).to(compute)
    out = layer.down(a, idx, wts, torch.zeros(7, 64))
    assert rel_err(out, reference(spec, experts, x, idx, wts, compute, stage="down", a=a)) <= TOL[compute]
    fused = layer.forward(x, idx, wts, torch.zeros(7, 64))
    assert rel_err(fused, out.double()) <= 2 * TOL[compute]  # torch's sigmoid vs the kernels' exp


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "fmt", [ExpertFormat("mxfp4", bias=torch.bfloat16), ExpertFormat("fp8", block=(32, 32))], ids=["mxfp4", "fp8"]
)
def test_experts_with_many_rows_go_through_torch_gemm(fmt, compute, kernel_status, gen):
    """At or above gemm_min_rows an expert is decoded densely (the decoders' values) and computed by torch's
    GEMM, the others by the kernel; the sum is the layer's. torch's bf16 GEMM rounds both projections to bf16
    (as the stock model's linears do), so bf16 is held to a few bf16 ulps (1e-2) there."""
    spec = MoELayerSpec(4, 64, 32, fmt, fmt, activation="gpt_oss", glu_layout="interleaved")
    experts = make_experts(spec, gen)
    idx = torch.tensor([[0, 1]] * 20 + [[2, 3]] * 3)  # experts 0 and 1: 20 rows; 2 and 3: 3 rows
    wts = torch.rand(23, 2, generator=gen)
    x = torch.randn(23, 64, generator=gen).to(compute)
    ref = reference(spec, experts, x, idx, wts, compute)
    split = build(spec, experts, gemm_min_rows=16)
    out = split.forward(x, idx, wts, torch.ones(23, 64), accumulate=True)
    assert rel_err(out - 1, ref) <= (1e-5 if compute == torch.float32 else 1e-2)
    assert rel_err(out[20:] - 1, ref[20:]) <= TOL[compute]  # rows of the kernel's experts only


def test_the_gemm_crossover_is_measured_once_per_machine(kernel_status, monkeypatch, tmp_path, gen):
    from moe_patch.kernels import crossover

    monkeypatch.setenv("MOE_PATCH_KERNEL_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(crossover, "measure_gemm_min_rows", lambda kind, dtype: calls.append(kind) or 16.0)
    reg = crossover.Crossovers()
    assert reg.get("mxfp4", torch.bfloat16) == 16.0 and reg.get("mxfp4", torch.bfloat16) == 16.0
    assert crossover.Crossovers().get("mxfp4", torch.bfloat16) == 16.0  # a new process reads the file
    assert calls == ["mxfp4"]
    monkeypatch.setattr(crossover, "CROSSOVERS", reg)
    from moe_patch.kernels import layer as klayer

    monkeypatch.setattr(klayer, "CROSSOVERS", reg)
    spec = MoELayerSpec(2, 64, 32, MX, MX)
    auto = build(spec, make_experts(spec, gen), gemm_min_rows="auto")
    assert auto._gemm_experts(torch.bfloat16, torch.tensor([[0, 1]] * 16)) == [0, 1]
    assert auto._gemm_experts(torch.bfloat16, torch.tensor([[0, 1]] * 15)) == []


def test_measuring_the_crossover_runs_the_kernel_alone(kernel_status, monkeypatch):
    """The measurement times the fused kernel with the GEMM path off (asking the crossover from inside its own
    measurement would wait on itself), decodes and runs the GEMM, and answers a bucket or inf."""
    from moe_patch.kernels import crossover
    from moe_patch.kernels import layer as klayer

    class NoCrossover:
        def get(self, *a):
            raise AssertionError("the measurement asked for the crossover")

    monkeypatch.setattr(klayer, "CROSSOVERS", NoCrossover())

    def timed(*seconds):  # best_seconds that runs each contender once and reports ``seconds``
        return lambda *fns, **kw: tuple((fn(), s)[1] for fn, s in zip(fns, seconds, strict=True))

    monkeypatch.setattr(crossover, "best_seconds", timed(1.0, 0.5))  # kernel, GEMM: the GEMM wins at once
    assert crossover.measure_gemm_min_rows("mxfp4", torch.bfloat16) == crossover.ROW_BUCKETS[0]
    monkeypatch.setattr(crossover, "best_seconds", timed(1.0, 1.0))
    assert crossover.measure_gemm_min_rows("bf16", torch.float32) == float("inf")


def test_accumulate_dtypes_and_strides(layer_case, gen):
    spec, experts, layer = layer_case
    idx, wts = routing(6, 2, 5, gen)
    big = torch.randn(6, 100, generator=gen, dtype=torch.bfloat16)
    x = big[:, 10:74]  # rows not contiguous with each other
    ref = reference(spec, experts, x, idx, wts.to(torch.bfloat16), torch.bfloat16)
    base = torch.randn(6, 64, generator=gen)
    out = layer.forward(x, idx, wts.to(torch.bfloat16), base.clone(), accumulate=True)
    assert rel_err(out - base, ref) <= 1e-3  # the difference of two fp32 values near each other
    out16 = layer.forward(x, idx, wts.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and rel_err(out16, ref) <= 2**-8
    x16 = x.to(torch.float16)
    out = layer.forward(x16, idx, wts.half(), torch.zeros(6, 64))
    assert rel_err(out, reference(spec, experts, x16.float(), idx, wts.half(), torch.float32)) <= TOL[torch.float32]
    assert layer.forward(x[:0], idx[:0], wts[:0]).shape == (0, 64)


def test_long_inputs_are_computed_in_chunks(layer_case, gen, monkeypatch):
    """Chunks change the rows per expert, hence the tile shapes, hence only the fp32 summation order."""
    from moe_patch.kernels import layer as klayer

    spec, experts, layer = layer_case
    idx, wts = routing(11, 2, 5, gen)
    x = torch.randn(11, 64, generator=gen)
    whole = layer.forward(x, idx, wts, torch.zeros(11, 64))
    h_whole = layer.gate_up(x, idx)
    monkeypatch.setattr(klayer, "MAX_TOKENS", 4)
    assert rel_err(layer.forward(x, idx, wts, torch.zeros(11, 64)), whole.double()) <= 1e-6
    assert rel_err(layer.gate_up(x, idx), h_whole.double()) <= 1e-6
    a = torch.randn(22, 32, generator=gen)
    monkeypatch.setattr(klayer, "MAX_TOKENS", 4096)
    down_whole = layer.down(a, idx, wts, torch.zeros(11, 64))
    monkeypatch.setattr(klayer, "MAX_TOKENS", 3)
    assert rel_err(layer.down(a, idx, wts, torch.zeros(11, 64)), down_whole.double()) <= 1e-6


def test_results_do_not_depend_on_the_thread_count(layer_case, gen):
    """Each output element is summed by one thread in a fixed order: 1 and 2 threads agree bit for bit."""
    _, _, layer = layer_case
    idx, wts = routing(40, 2, 5, gen)
    x = torch.randn(40, 64, generator=gen).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer.forward(x, idx, wts, torch.zeros(40, 64))
        torch.set_num_threads(2)
        two = layer.forward(x, idx, wts, torch.zeros(40, 64))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_a_workspace_is_reused_not_reallocated(layer_case, gen):
    _, _, layer = layer_case
    ws = Workspace()
    idx, wts = routing(4, 2, 5, gen)
    x = torch.randn(4, 64, generator=gen)
    layer.forward(x, idx, wts, workspace=ws)
    size = ws.nbytes
    buffer = ws._buf.data_ptr()
    for _ in range(3):
        layer.forward(x, idx, wts, workspace=ws)
    assert ws.nbytes == size and ws._buf.data_ptr() == buffer


def test_bad_calls_are_one_clear_error(layer_case, gen):
    spec, experts, layer = layer_case
    idx, wts = routing(3, 2, 5, gen)
    x = torch.randn(3, 64)
    cases = [
        (lambda: layer.forward(torch.randn(3, 63), idx, wts), "shape"),
        (lambda: layer.forward(x.to(torch.float64), idx, wts), "float64"),
        (lambda: layer.forward(x, idx.int(), wts), "int64"),
        (lambda: layer.forward(x, idx, wts[:, :1]), "top_k_weights"),
        (lambda: layer.forward(x, idx, wts, torch.zeros(3, 64).t().contiguous().t()), "contiguous rows"),
        (lambda: layer.forward(x.t(), idx, wts), "shape"),
        (lambda: layer.down(torch.randn(5, 32), idx, wts, torch.zeros(3, 64)), "shape"),
        (lambda: layer.decode(9, "down"), "not attached"),
        (lambda: layer.decode(0, "up"), "projection"),
        (lambda: layer.set_expert(7, None), "outside"),
    ]
    for call, words in cases:
        with pytest.raises(InvalidArgumentError, match=words):
            call()


def test_expert_tensors_are_checked_where_they_enter(kernel_status, gen):
    spec = MoELayerSpec(2, 64, 32, ExpertFormat("fp8", block=(32, 32)), ExpertFormat("fp8", block=(32, 32)))
    layer = MoEKernel(spec)
    gu, dn = make_experts(spec, gen)[0]
    good = expert_weights(gu, dn)
    bad = {
        "dtype": ExpertWeights(gu.weight.view(torch.uint8), dn.weight, gu.scale, dn.scale),
        "shape": ExpertWeights(gu.weight[:10], dn.weight, gu.scale, dn.scale),
        "missing": ExpertWeights(gu.weight, dn.weight, None, dn.scale),
        "contiguous": ExpertWeights(gu.weight, dn.weight, gu.scale.t().contiguous().t(), dn.scale),
        "has no bias": ExpertWeights(gu.weight, dn.weight, gu.scale, dn.scale, gate_up_bias=torch.zeros(64)),
    }
    for words, weights in bad.items():
        with pytest.raises(InvalidArgumentError, match=words):
            layer.set_expert(1, weights)
        assert not layer.has_expert(1)  # nothing half-attached
    layer.set_expert(1, good)
    assert layer.has_expert(1)


@pytest.mark.parametrize(
    "fmt,why",
    [
        (ExpertFormat("bf16", transposed=True), "transposed"),
        (ExpertFormat("fp8", block=(128, 48)), "power-of-two"),
        (ExpertFormat("int4", group_size=48), "power-of-two"),
    ],
)
def test_layouts_the_kernels_do_not_cover_are_refused(fmt, why, kernel_status):
    """Refused at construction with the reason, so the caller keeps its torch path."""
    with pytest.raises(KernelUnavailableError, match=why):
        MoEKernel(MoELayerSpec(2, 192, 96, fmt, fmt))
    with pytest.raises(KernelUnavailableError, match="multiple of 32"):
        MoEKernel(MoELayerSpec(2, 40, 32, MX, MX))


def test_spec_and_format_arguments_are_checked():
    with pytest.raises(InvalidArgumentError, match="kind"):
        ExpertFormat("nf4")
    with pytest.raises(InvalidArgumentError, match="activation"):
        MoELayerSpec(2, 8, 8, MX, MX, activation="relu")
    with pytest.raises(InvalidArgumentError, match="hidden"):
        MoELayerSpec(2, 0, 8, MX, MX)


@pytest.mark.parametrize("activation", ["silu", "gpt_oss", "gelu_tanh"])
def test_activations_match_torch_on_large_and_tiny_gates(activation, kernel_status):
    """The kernels' exp-based activations hold across the fp32 range: they saturate like torch's (no
    overflow to NaN at large |gate|)."""
    spec = MoELayerSpec(1, 32, 32, ExpertFormat("fp32"), ExpertFormat("fp32"), activation=activation)
    layer = MoEKernel(spec)
    eye = torch.cat([torch.eye(32), torch.eye(32)])  # gate = up = x
    layer.set_expert(0, ExpertWeights(eye, torch.eye(32)))
    x = torch.tensor([[-1e30, -100.0, -20.0, -1e-3, 0.0, 1e-30, 2.0, 90.0] * 4])
    out = layer.forward(x, torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))
    if activation == "silu":
        want = F.silu(x) * x
    elif activation == "gelu_tanh":
        want = F.gelu(x, approximate="tanh") * x
    else:
        g, u = x.clamp(max=7.0), x.clamp(-7.0, 7.0)
        want = (u + 1) * g * torch.sigmoid(g * 1.702)
    assert torch.allclose(out, want, rtol=2e-6, atol=1e-30)
