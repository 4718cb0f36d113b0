"""Quantized (FP8, MXFP4, compressed-tensors) and fused-on-disk (Llama 4, DBRX) checkpoints are offloaded in
their stored bytes and generate exactly what stock transformers' dequantized load of the same folder does.

Checkpoints are tiny random models packed by ``moe_patch.testing.quantized``; the oracle for each is
described in ``tests/helpers/formats.py``.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_patch
from moe_patch.errors import CheckpointError, MoEConfigError
from moe_patch.formats import FORMATS, StoredTensor, read_quantization_config
from moe_patch.formats.compressed import dequantize_int
from moe_patch.formats.fp8 import dequantize_fp8
from moe_patch.formats.mxfp4 import dequantize_mxfp4
from moe_patch.offload import get_offload_handle
from moe_patch.offload.costmodel import choose_device_format
from moe_patch.testing.quantized import quantize_fp8_block, quantize_int_group, quantize_mxfp4
from tests.helpers.formats import CASES, load_oracle, save_case
from tests.helpers.offload import greedy, prompts

NEW = 64
QUANTIZED = [n for n, c in CASES.items() if c.pack is not None]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {name: save_case(name, root) for name in CASES}


@pytest.fixture(scope="module")
def oracles(checkpoints):
    torch.set_num_threads(1)
    out = {}
    for name, path in checkpoints.items():
        model = load_oracle(name, path)
        out[name] = {"logits": model(prompts(4)).logits, **{b: greedy(model, prompts(b), NEW) for b in (1, 4)}}
    return out


def _sizes(path) -> tuple[int, int]:
    """(stored, fp32-decoded) bytes of the largest expert."""
    model = moe_patch.load_model(path, dtype=torch.float32)
    handle = get_offload_handle(model)
    engine = handle.engine
    sizes = (
        max(engine.source.nbytes(layer.index, 0) for layer in engine.layers),
        max(layer.expert_bytes for layer in engine.layers),
    )
    handle.detach(restore_weights=False)
    return sizes


def _one_expert(path) -> int:
    """Stored bytes of the largest expert (the smallest budget that works with stored device entries)."""
    return _sizes(path)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("budget", ["one_expert", "everything"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_generation_matches_stock_dequantized_load(name, batch, budget, checkpoints, oracles):
    path = checkpoints[name]
    limit = _one_expert(path) if budget == "one_expert" else None
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=limit)  # prefetch on
    handle = get_offload_handle(model)
    try:
        if batch == 4:
            assert _rel(model(prompts(4)).logits, oracles[name]["logits"]) < 1e-5
        assert torch.equal(greedy(model, prompts(batch), NEW), oracles[name][batch])
        if limit is not None:
            assert handle.engine.dev.peak <= limit
            assert handle.stats.bytes_read["decode"]["disk"] > 0
    finally:
        handle.detach(restore_weights=False)


@pytest.mark.parametrize("name", ["deepseek_v3-fp8", "gpt_oss-mxfp4", "qwen3_moe-int4"])
@pytest.mark.parametrize("device_format", ["stored", "dequantized"])
def test_cpu_compute_of_host_resident_misses_and_both_device_formats(name, device_format, checkpoints, oracles):
    path = checkpoints[name]
    stored, decoded = _sizes(path)
    model = moe_patch.load_model(
        path,
        dtype=torch.float32,
        options=moe_patch.offload.OffloadOptions(
            expert_cache=4 * (stored if device_format == "stored" else decoded),
            host_cache=None,
            cpu_compute="always",
            device_format=device_format,
        ),
    )
    handle = get_offload_handle(model)
    try:
        assert torch.equal(greedy(model, prompts(4), NEW), oracles[name][4])
        stats = handle.stats
        assert stats.device_format == device_format
        assert (
            stats.stored_format.split(":")[0]
            == read_quantization_config(json.loads((path / "config.json").read_text())["quantization_config"]).method
        )
        cpu = sum(layer.cpu_computed for layer in stats.layers)
        if device_format == "dequantized":  # decoded slots, stored host copies: misses in RAM computed there
            assert not handle.engine.merged and cpu > 0
        else:  # stored slots are the host RAM tier itself on a CPU-only run: there is no other copy to use
            assert handle.engine.merged and cpu == 0
    finally:
        handle.detach(restore_weights=False)


def test_caches_hold_the_stored_bytes(checkpoints):
    """Host entries (and stored device entries) take the checkpoint's stored bytes, not the decoded size."""
    path = checkpoints["deepseek_v3-fp8"]
    model = moe_patch.load_model(
        path,
        dtype=torch.bfloat16,
        expert_cache=None,
        host_cache=None,
        options=moe_patch.offload.OffloadOptions(host_cache=None, device_format="stored"),
    )
    handle = get_offload_handle(model)
    try:
        greedy(model, prompts(2), 8)
        engine = handle.engine
        stored = engine.source.nbytes(0, 0)
        decoded = engine.layers[0].expert_bytes  # bf16
        # FP8 is half of bf16, plus one float32 scale per 8x8 block
        assert stored == decoded // 2 + 4 * sum((s[0] // 8) * (s[1] // 8) for s in engine.layers[0].shapes.values())
        assert len(engine.dev) > 0 and all(engine.dev.nbytes(k) == stored for k in engine.dev.keys())
        assert engine.dev.used == stored * len(engine.dev)
        group = engine.dev.groups[0]
        entry = next(o for o in group.objects if o is not None)
        assert entry.nbytes == stored and all(
            isinstance(t, StoredTensor) or t.dim() == 1 for t in entry.tensors.values()
        )
        assert handle.stats.stored_expert_bytes == stored < decoded
    finally:
        handle.detach(restore_weights=False)


def test_detach_restores_the_dequantized_weights(checkpoints):
    path = checkpoints["gpt_oss-mxfp4"]
    oracle = load_oracle("gpt_oss-mxfp4", path)
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=_one_expert(path))
    get_offload_handle(model).detach()
    want = oracle.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_llama4_offload_computes_only_the_routed_experts(checkpoints, oracles):
    """Stock Llama 4 runs every expert on every token; the offloaded forward runs the top-k only."""
    path = checkpoints["llama4-fused"]
    model = moe_patch.load_model(path, dtype=torch.float32)
    handle = get_offload_handle(model)
    import moe_patch.offload.backends.cpu as engine_module  # where the CPU backend computes cached experts

    rows = []
    grouped = engine_module.bank_dispatch

    def counting(bank, x, index, weights, **kw):
        rows.append(int((index < bank.num_experts).sum()))  # slots routed to a cached expert's slot
        return grouped(bank, x, index, weights, **kw)

    engine_module.bank_dispatch = counting
    try:
        ids = prompts(4)
        with torch.no_grad():  # (under autograd cached experts run one by one, on owned copies)
            model(ids)  # every expert read once
            assert _rel(model(ids).logits, oracles["llama4-fused"]["logits"]) < 1e-5
        top_k, layers = model.config.num_experts_per_tok, model.config.num_hidden_layers
        assert sum(rows[-layers:]) == ids.numel() * top_k * layers  # rows computed: tokens x k, not tokens x E
    finally:
        engine_module.bank_dispatch = grouped
        handle.detach(restore_weights=False)


# --------------------------------------------------------------------------- decoders, bit for bit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,block,fmt",
    [
        ((256, 384), (128, 128), "float"),
        ((200, 300), (128, 128), "float"),
        ((24, 40), (16, 16), "float"),
        ((64, 96), (32, 32), "ue8m0"),
        ((48, 64), None, "float"),
    ],
)
def test_fp8_decoder_matches_transformers(shape, block, fmt, dtype):
    q, s = quantize_fp8_block(torch.randn(shape), block, fmt)
    ours = dequantize_fp8(q, s, block, dtype)
    assert torch.equal(ours, FORMATS["fp8"].reference(q, s, list(block) if block else None, dtype))
    if block is None or all(d % b == 0 for d, b in zip(shape, block)):
        # where stock loading is right, it agrees bit for bit (float32 product, one rounding)
        assert torch.equal(ours, FORMATS["fp8"].reference_loader(q, s, dtype))


def test_stock_fp8_loading_guesses_the_block_from_the_shapes():
    """Pins the transformers pitfall the ragged-case oracle works around: a 200-row weight with 128-row
    blocks has a 2-row scale grid, from which Fp8Dequantize infers 100-row blocks. If this starts to fail,
    transformers was fixed and tests/helpers/formats.py can use its stock loader for every case."""
    q, s = quantize_fp8_block(torch.randn(200, 300), (128, 128))
    right = dequantize_fp8(q, s, (128, 128), torch.float32)
    assert not torch.allclose(FORMATS["fp8"].reference_loader(q, s, torch.float32), right)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_decoder_matches_transformers(dtype):
    w = torch.randn(48, 128) * torch.logspace(-20, 20, 128)  # exponents far from zero in both directions
    blocks, scales = quantize_mxfp4(w)
    assert torch.equal(dequantize_mxfp4(blocks, scales, dtype).t(), FORMATS["mxfp4"].reference(blocks, scales, dtype))


@pytest.mark.parametrize("bits,group", [(4, 32), (4, None), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_int_decoder_matches_compressed_tensors(bits, group, dtype):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    w = torch.randn(32, 64).to(torch.bfloat16)
    q, scale = quantize_int_group(w, bits, group or 64)
    scheme = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group" if group else "channel"}
    if group:
        scheme["group_size"] = group
    packed = pack_to_int32(q, bits)
    ours = dequantize_int(packed, scale, None, bits=bits, group_size=group, shape=(32, 64), dtype=dtype)
    assert torch.equal(ours, FORMATS["compressed-tensors"].reference(packed, scale, None, (32, 64), scheme, dtype))


def test_asymmetric_int4_with_packed_zero_points_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    zp = torch.randint(-8, 8, (32, 2), dtype=torch.int8)
    scale = torch.rand(32, 2, dtype=torch.bfloat16) + 0.1
    scheme = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    packed, packed_zp = pack_to_int32(q, 4), pack_to_int32(zp, 4, packed_dim=0)
    ours = dequantize_int(packed, scale, packed_zp, bits=4, group_size=32, shape=(32, 64), dtype=torch.float32)
    assert torch.equal(
        ours, FORMATS["compressed-tensors"].reference(packed, scale, packed_zp, (32, 64), scheme, torch.float32)
    )


@pytest.mark.parametrize("name", QUANTIZED)
def test_packed_checkpoints_are_what_transformers_reads(name, checkpoints):
    """The packers quantize the right tensors in the right orientation: stock transformers' dequantized
    load of each packed folder is the original model up to the format's rounding."""
    import transformers

    path = checkpoints[name]
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(path.parent / f"{name}-bf16", dtype=torch.float32)
    stock = load_oracle(name, path)
    want = bf16.state_dict()
    tolerance = {"mxfp4": 0.35, "compressed": 0.2, "metal": 0.2}.get(CASES[name].oracle, 0.08)
    for key, value in stock.state_dict().items():
        if ".experts." in key and value.dim() >= 2:
            assert _rel(value, want[key]) < tolerance, key


# --------------------------------------------------------------------------- policy
def test_device_format_cost_model():
    mib = 2**20
    # everything fits decoded: never pay a decode per use
    assert choose_device_format(100 * mib, 10, 1 * mib, 2 * mib, decode_s=1e-3, miss_s=1.0) == "dequantized"
    # a partial fit: stored wins when a miss costs more than a decode (GPU decode against a PCIe copy) ...
    assert choose_device_format(10 * mib, 20, 1 * mib, 2 * mib, decode_s=1e-5, miss_s=1e-3) == "stored"
    # ... and loses when a decode costs more than a miss (a slow CPU decode, misses from RAM)
    assert choose_device_format(10 * mib, 20, 1 * mib, 2 * mib, decode_s=5e-3, miss_s=1e-4) == "dequantized"
    # not one decoded expert fits
    assert choose_device_format(3 * mib // 2, 20, 1 * mib, 2 * mib, decode_s=1.0, miss_s=0.0) == "stored"


# --------------------------------------------------------------------------- bad input
def _snapshot(path):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir())}


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path, edit):
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        if edit(tensors):
            save_file(tensors, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        present = {}
        for shard in sorted(path.glob("*.safetensors")):
            present.update(dict.fromkeys(load_file(shard), shard.name))
        data["weight_map"] = present
        index.write_text(json.dumps(data))


def _edit_config(path, edit):
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _drop_one_scale(t):
    key = next(k for k in sorted(t) if k.endswith("experts.3.gate_proj.weight_scale_inv"))
    del t[key]
    return True


def _bad_scale_shape(t):
    key = next(k for k in sorted(t) if k.endswith("experts.2.down_proj.weight_scale_inv"))
    t[key] = torch.ones(1, 1)
    return True


BAD = {
    "missing scale tensor": (
        "deepseek_v3-fp8",
        lambda p: _edit_tensors(p, _drop_one_scale),
        CheckpointError,
        "experts.3.gate_proj.weight_scale_inv' is absent",
    ),
    "scale shape does not match its weight": (
        "deepseek_v3-fp8",
        lambda p: _edit_tensors(p, _bad_scale_shape),
        CheckpointError,
        "experts.2.down_proj.weight_scale_inv.*shape \\[1, 1\\]",
    ),
    "weight_block_size inconsistent with the scales": (
        "deepseek_v3-fp8",
        lambda p: _edit_config(p, lambda q: q.update(weight_block_size=[16, 16])),
        CheckpointError,
        "weight_block_size",
    ),
    "weight_block_size malformed": (
        "deepseek_v3-fp8",
        lambda p: _edit_config(p, lambda q: q.update(weight_block_size="128")),
        MoEConfigError,
        "quantization_config.weight_block_size",
    ),
    "compressed-tensors without config_groups": (
        "qwen3_moe-int4",
        lambda p: _edit_config(p, lambda q: q.pop("config_groups")),
        MoEConfigError,
        "quantization_config.config_groups",
    ),
    "unsupported compressed scheme": (
        "qwen3_moe-int4",
        lambda p: _edit_config(p, lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=3)),
        MoEConfigError,
        "int 3-bit",
    ),
    "MXFP4 scales missing": (
        "gpt_oss-mxfp4",
        lambda p: _edit_tensors(
            p, lambda t: bool([t.pop(k) for k in list(t) if k.endswith("layers.1.mlp.experts.down_proj_scales")])
        ),
        CheckpointError,
        "down_proj",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantized_checkpoints_fail_before_generation_naming_the_place(case, checkpoints, tmp_path):
    name, breaks, error, message = BAD[case]
    path = _copy(checkpoints[name], tmp_path / "ckpt")
    breaks(path)
    before = _snapshot(path)
    with pytest.raises(error, match=message):
        moe_patch.load_model(path, dtype=torch.float32)
    assert _snapshot(path) == before  # nothing written, nothing left behind
    assert not any(p.name.startswith(".") for p in path.iterdir())


def test_quantize_experts_on_an_already_quantized_checkpoint_is_refused(checkpoints):
    with pytest.raises(MoEConfigError, match="already quantized .*fp8"):
        moe_patch.load_model(checkpoints["deepseek_v3-fp8"], quantize_experts="nf4")


def test_quantization_spec_reads_each_method():
    assert read_quantization_config(None) is None
    fp8 = read_quantization_config({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"})
    assert fp8.experts.block == (128, 128) and fp8.experts.scale_fmt == "ue8m0"
    assert read_quantization_config({"quant_method": "fp8"}).experts.block == (128, 128)  # transformers' default
    assert read_quantization_config({"quant_method": "mxfp4"}).experts.kind == "mxfp4"
    with pytest.raises(MoEConfigError, match="'gptq' is not supported.*fp8, mxfp4, compressed-tensors"):
        read_quantization_config({"quant_method": "gptq", "bits": 4})


def test_no_temporary_files_from_offloading(checkpoints):
    path = checkpoints["qwen3_moe-int4"]
    before = set(os.listdir(path))
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=_one_expert(path))
    greedy(model, prompts(1), 4)
    get_offload_handle(model).detach(restore_weights=False)
    assert set(os.listdir(path)) == before


def test_inspect_plans_with_stored_bytes_gpt_oss_120b_fits_64gib_of_ram(tmp_path, capsys):
    """gpt-oss-120b's MXFP4 experts (61 GB stored, 229 GB as bf16) plan into 24 GiB GPU + 64 GiB RAM."""
    from moe_patch.cli import main

    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 36,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 201088,
        "sliding_window": 128,
        "torch_dtype": "bfloat16",
        "layer_types": ["sliding_attention", "full_attention"] * 18,
        "quantization_config": {"quant_method": "mxfp4"},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(tmp_path), "--gpu", "24GiB", "--ram", "64GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    stored = data["checkpoint"]["stored_format"]
    assert stored["format"].startswith("mxfp4")
    assert 60e9 < stored["total_bytes"] < 62e9 and stored["dequantized_total_bytes"] > 3.7 * stored["total_bytes"]
    plan = data["memory_plan"]
    assert plan["expert_bytes"] == stored["total_bytes"] and plan["disk_expert_bytes"] == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_metal_affine_decoder_matches_transformers(bits, dtype):
    from transformers.integrations.metal_quantization import _affine_quantize_tensor

    from moe_patch.formats.metal import dequantize_affine

    w = (torch.randn(48, 256) * torch.logspace(-3, 3, 256)).to(dtype)
    packed, scales, biases = _affine_quantize_tensor(w, 64, bits)
    scales, biases = scales.to(dtype), biases.to(dtype)
    ours = dequantize_affine(packed, scales, biases, bits=bits, group_size=64, dtype=dtype)
    assert torch.equal(ours, FORMATS["metal"].reference(packed, scales, biases, bits=bits, group_size=64))
