"""Bad checkpoints and budgets fail before generation with errors naming the file and tensor;
I/O failures during generation raise instead of computing with missing weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moe_patch
from moe_patch.errors import BudgetError, CheckpointError, MoEConfigError
from moe_patch.offload import get_offload_handle
from tests.helpers.offload import expert_bytes, greedy, load_reference, prompts, save_tiny


@pytest.fixture
def sharded(tmp_path):
    """A Mixtral-tiny checkpoint split over several shards with an index."""
    path = tmp_path / "ckpt"
    from tests.helpers.offload import build

    build("mixtral").save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def _index(path):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def _shard_of(path, key):
    return path / _index(path)[key]


EXPERT_KEY = "model.layers.1.block_sparse_moe.experts.2.w1.weight"


def test_missing_shard_is_named(sharded):
    shard = _shard_of(sharded, EXPERT_KEY)
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name) as err:
        moe_patch.load_model(sharded)
    assert "missing" in str(err.value)


def test_truncated_shard_is_named_with_its_tensor(sharded):
    shard = _shard_of(sharded, EXPERT_KEY)
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated") as err:
        moe_patch.load_model(sharded)
    assert shard.name in str(err.value) and "tensor" in str(err.value)


def _raw_safetensors(path: Path, entries: dict, data: bytes) -> Path:
    header = json.dumps(entries).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize(
    "offsets, data, message",
    [
        ({"a": [0, 8], "b": [4, 12]}, bytes(12), "overlaps"),
        ({"a": [0, 8], "b": [12, 20]}, bytes(20), "4 bytes unused"),
        ({"a": [0, 8], "b": [8, 16]}, bytes(20), "4 bytes follow the last tensor"),
    ],
)
def test_files_safetensors_refuses_are_refused_by_the_reader(tmp_path, offsets, data, message):
    """Every file the one checkpoint reader (offload, push, converters) accepts, safetensors loads."""
    from safetensors import SafetensorError

    from moe_patch.io import read_header

    entries = {k: {"dtype": "F32", "shape": [2], "data_offsets": v} for k, v in offsets.items()}
    file = _raw_safetensors(tmp_path / "bad.safetensors", entries, data)
    with pytest.raises(SafetensorError):
        load_file(file)
    with pytest.raises(CheckpointError, match=message):
        read_header(file)


def test_the_reader_accepts_what_safetensors_writes(tmp_path):
    from moe_patch.io import read_header

    tensors = {"z": torch.zeros(0), "b": torch.ones(3, dtype=torch.bfloat16), "a": torch.arange(5)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    assert sorted(read_header(tmp_path / "ok.safetensors")) == ["a", "b", "z"]


def test_tensor_absent_from_index_is_named(sharded):
    idx_path = sharded / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    del idx["weight_map"][EXPERT_KEY]
    idx_path.write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=EXPERT_KEY.replace(".", r"\.")):
        moe_patch.load_model(sharded)


def _rewrite(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_expert_with_wrong_dtype_is_named(tmp_path):
    path = save_tiny("qwen3_moe", tmp_path / "q")
    key = "model.layers.0.mlp.experts.3.up_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(key, t[key].to(torch.int32)))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        moe_patch.load_model(path)
    assert "int32" in str(err.value) and "model.safetensors" in str(err.value)


def test_shape_that_does_not_match_config_is_named(tmp_path):
    path = save_tiny("qwen2_moe", tmp_path / "q")
    cfg = json.loads((path / "config.json").read_text())
    cfg["moe_intermediate_size"] = 24  # checkpoint experts have 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts\.0\.(gate|up|down)_proj\.weight") as err:
        moe_patch.load_model(path)
    assert "config" in str(err.value)


def test_fused_checkpoint_with_wrong_expert_count_is_named(tmp_path):
    path = save_tiny("gpt_oss", tmp_path / "g")
    key = "model.layers.0.mlp.experts.down_proj"
    _rewrite(path, lambda t: t.__setitem__(key, t[key][:3].clone()))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        moe_patch.load_model(path)


def test_budget_smaller_than_one_expert_says_the_minimum(tmp_path):
    path = save_tiny("mixtral", tmp_path / "m")
    need = expert_bytes("mixtral")
    with pytest.raises(BudgetError, match=f"{need} bytes"):
        moe_patch.load_model(path, expert_cache=need - 1)
    with pytest.raises(BudgetError, match="host_cache"):
        moe_patch.load_model(path, expert_cache=need, host_cache=10)


def test_shard_truncated_mid_run_raises_instead_of_zeros(tmp_path):
    path = save_tiny("mixtral", tmp_path / "m")
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=expert_bytes("mixtral"))
    greedy(model, prompts(1), 4)  # runs while the file is intact
    file = path / "model.safetensors"
    os.truncate(file, 4096)  # most expert tensors now lie past the end
    with pytest.raises(CheckpointError, match="model.safetensors"):
        greedy(model, prompts(1), 16)


def test_disk_error_in_a_background_read_surfaces_in_the_forward(tmp_path, monkeypatch):
    import errno

    path = save_tiny("qwen2_moe", tmp_path / "q")
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=2 * expert_bytes("qwen2_moe"))
    assert get_offload_handle(model).engine.options.prefetch  # reads also happen on the prefetch thread
    calls = {"n": 0}
    real = os.preadv

    def failing_disk(fd, buffers, offset):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", failing_disk)
    with pytest.raises(CheckpointError, match="Input/output error"):
        greedy(model, prompts(1), 32)


def test_load_model_from_a_repo_id_downloads_safetensors_only(hub, tmp_path):
    """Against the loopback Hub of tests/helpers/hub_server.py, driven by the real huggingface_hub client."""
    from hub_scripts.push import push_folder

    path = save_tiny("mixtral", tmp_path / "m")
    (path / "pytorch_model.bin").write_bytes(b"never downloaded: pickles are not loaded")
    push_folder(path, "tester/tiny-mixtral")
    model = moe_patch.load_model("tester/tiny-mixtral", dtype=torch.float32)
    assert get_offload_handle(model) is not None
    downloaded = {p.name for p in Path(model.config._name_or_path).iterdir()}
    assert any(n.endswith(".safetensors") for n in downloaded) and "pytorch_model.bin" not in downloaded


def test_hub_download_failure_becomes_checkpoint_error(hub):
    with pytest.raises(CheckpointError, match="tester/absent"):
        moe_patch.load_model("tester/absent")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fbgemm_fp8", None])
def test_unsupported_quantization_methods_are_refused_before_reading(tmp_path, method):
    path = save_tiny("mixtral", tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    for shard in path.glob("*.safetensors"):
        shard.write_bytes(b"")  # nothing may be read: an empty shard would fail if it were
    with pytest.raises(
        MoEConfigError,
        match=f"quant_method {repr(method) if method else '.missing.'} is not "
        "supported.*fp8, mxfp4, compressed-tensors",
    ):
        moe_patch.load_model(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1])
def test_non_finite_or_negative_budgets_are_budget_errors(tmp_path, value):
    from moe_patch.offload import parse_bytes

    with pytest.raises(BudgetError, match="finite, non-negative"):
        parse_bytes(value, name="expert_cache")


def test_bf16_keeps_transformers_fp32_modules(tmp_path):
    """DeepSeek-V3's e_score_correction_bias stays fp32 in a bf16 model, as with from_pretrained."""
    path = save_tiny("deepseek_v3", tmp_path / "ds")
    ref = load_reference("deepseek_v3", path).to(torch.bfloat16)
    ref = type(ref).from_pretrained(path, dtype=torch.bfloat16)
    model = moe_patch.load_model(path, dtype=torch.bfloat16)
    want = {n: b.dtype for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias")}
    got = {n: b.dtype for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert want and got == want and set(want.values()) == {torch.float32}


def test_gradients_through_evicted_experts_match_the_resident_model(tmp_path):
    """Cache slots are recycled after each expert: backward must not read another expert's weights."""
    path = save_tiny("qwen3_moe", tmp_path / "q")
    ids = prompts(4)

    def embedding_grad(model):
        emb = model.get_input_embeddings()
        emb.weight.requires_grad_(True)
        model(ids, labels=ids).loss.backward()
        return emb.weight.grad

    ref = embedding_grad(load_reference("qwen3_moe", path))
    got = embedding_grad(moe_patch.load_model(path, dtype=torch.float32, expert_cache=expert_bytes("qwen3_moe")))
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_zero_computation_experts_stay_resident_with_one_line():
    """LongCat-Flash routes identity experts beside the real ones: in its experts module (transformers 5.23) or, since
    5.25, in its block, which hands the experts a real expert id with weight 0 for each: offloaded, each would cost
    a read for nothing, so the blocks stay resident either way."""
    from moe_patch.errors import NoMoEFoundError
    from moe_patch.offload import attach_offload
    from moe_patch.testing.tiny import tiny_model

    model, _ = tiny_model("longcat_flash")
    with pytest.raises(NoMoEFoundError, match="not offloadable: .*Experts.*zero-computation experts"):
        attach_offload(model, options={"expert_cache": None})


def test_step3p7_experts_offload_exactly_where_decorated_and_are_refused_where_not():
    """step3p7's clamped experts: without transformers' experts decorator (5.23) they carry no layout flags the
    offloaded forward could follow and are refused in one line; decorated (5.25) they offload like any other."""
    from moe_patch.errors import NoMoEFoundError
    from moe_patch.families.fused import is_decorated
    from moe_patch.offload import attach_offload
    from moe_patch.testing.tiny import main_output, tiny_model

    model, inputs = tiny_model("step3p7", text_config={"swiglu_limits": [0.05, 0.05]})  # clamps that bite
    experts = [m for m in model.modules() if type(m).__name__ == "Step3p7Experts"]
    if not is_decorated(experts[0]):
        with pytest.raises(NoMoEFoundError, match="not offloadable: .*Experts"):
            attach_offload(model, options={"expert_cache": None})
        return
    with torch.no_grad():
        want = main_output(model(**inputs))
        handle = attach_offload(model, options={"expert_cache": None, "calibrate": False})
        try:
            got = main_output(model(**inputs))
        finally:
            handle.detach()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_a_cuda_device_this_machine_lacks_is_refused_before_anything_changes(monkeypatch):
    from moe_patch.offload import OffloadOptions, attach_offload
    from tests.helpers.offload import build

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = build("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MoEConfigError, match=r"'cuda:3' but this machine has 1 CUDA device \(cuda:0 to cuda:0\)"):
        attach_offload(model, options=OffloadOptions(device="cuda:3"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
