"""Upcycling I/O: streaming shards, atomic output, determinism, dry-run, CLI, bad input, Hub push."""

from __future__ import annotations

import errno
import json
import shutil
import sys
import types

import pytest
import torch
from safetensors import safe_open

import converters.pipeline as upcycle_module
from converters import (
    OutputError,
    UpcycleConfig,
    VerificationError,
    compare_models,
    plan_upcycle,
    upcycle,
)
from converters.checkpoint import DenseCheckpoint
from converters.writer import ShardWriter
from moe_patch.cli import main
from moe_patch.errors import CheckpointError, MoEConfigError
from tests.helpers.upcycle import load, make_dense, snapshot, source_config


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_dense(tmp_path_factory.mktemp("io") / "llama", "llama", seed=11)


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# -- streaming writer ----------------------------------------------------------------------------
def test_small_max_shard_size_gives_an_index_and_shards_within_the_limit(dense, tmp_path):
    out = tmp_path / "moe"
    upcycle(dense, out, UpcycleConfig(num_experts=8, top_k=2, granularity=2, max_shard_size="40KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    moe, ref = load(out), load(dense)
    assert compare_models(ref, moe, vocab_size=128, new_tokens=8).rel_diff <= 1e-5


def test_writer_header_is_the_safetensors_format(tmp_path):
    from safetensors.torch import load_file

    from converters.writer import TensorSpec

    specs = [
        TensorSpec("a", (3, 5), torch.bfloat16),
        TensorSpec("b", (0, 4), torch.float32),
        TensorSpec("c", (7,), torch.float32),
    ]
    w = ShardWriter(tmp_path, [specs])
    values = {"a": torch.randn(3, 5).bfloat16(), "b": torch.zeros(0, 4), "c": torch.arange(7.0)}
    for s in specs:
        w.write(s.name, values[s.name])
    assert w.close() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    for k, v in values.items():
        assert torch.equal(loaded[k], v)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_same_seed_and_inputs_give_byte_identical_files(dense, tmp_path):
    out = tmp_path / "moe"
    cfg = dict(num_experts=4, top_k=2, granularity=2, drop_ratio=0.25, noise=0.01, seed=4, max_shard_size="60KB")
    upcycle(dense, out, UpcycleConfig(**cfg))
    first = snapshot(out)
    upcycle(dense, out, UpcycleConfig(**cfg, overwrite=True))
    assert snapshot(out) == first
    upcycle(dense, out, UpcycleConfig(**{**cfg, "seed": 5}, overwrite=True))
    assert snapshot(out) != first


# -- atomic output -------------------------------------------------------------------------------
def test_existing_output_is_refused_without_overwrite(dense, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        upcycle(dense, out, UpcycleConfig(num_experts=4, top_k=2))
    assert (out / "keep.txt").read_text() == "mine"
    upcycle(dense, out, UpcycleConfig(num_experts=4, top_k=2, overwrite=True, verify=False))
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_overwrite_never_replaces_or_swallows_an_input(dense, tmp_path):
    import shutil

    src = shutil.copytree(dense, tmp_path / "models" / "llama")
    before = snapshot(src)
    for out in (src.parent, tmp_path / "x" / ".." / "models" / "llama", src / "sub"):
        with pytest.raises(MoEConfigError, match="must not be, contain or lie inside the input"):
            upcycle(src, out, UpcycleConfig(num_experts=4, top_k=2, overwrite=True, verify=False))
    assert snapshot(src) == before


def test_output_folder_is_readable_as_the_umask_allows(dense, tmp_path):
    import os

    out = upcycle(dense, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2, verify=False)) and tmp_path / "moe"
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask


def test_bf16_to_fp16_is_not_called_exact(tmp_path):
    from tests.helpers.upcycle import source_config

    src = make_dense(tmp_path / "bf16", "llama", config=source_config("llama", torch_dtype="bfloat16"))
    plan = plan_upcycle(src, UpcycleConfig(num_experts=4, top_k=2, dtype="float16"))
    try:
        assert not plan.exact and any("rounded" in r for r in plan.inexact_reasons)
    finally:
        plan.weights.close()


def test_every_n_with_no_sparse_layer_is_a_config_error(tmp_path):
    qwen2 = make_dense(tmp_path / "qwen2", "qwen2")
    with pytest.raises(MoEConfigError, match="no layer is sparse"):
        plan_upcycle(qwen2, UpcycleConfig(num_experts=4, top_k=2, moe_layers="every-99"))


def test_push_to_hub_repo_id_is_checked_before_converting(dense, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["upcycle", str(dense), str(out), "--num-experts", "4", "--push-to-hub", "not a repo"]) == 1
    assert not out.exists() and "not a valid repository id" in capsys.readouterr().err


def test_full_disk_leaves_no_partial_output(dense, tmp_path, monkeypatch):
    written = []

    def write_bytes(self, data):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        self._file.write(data)

    monkeypatch.setattr(ShardWriter, "_write_bytes", write_bytes)
    out = tmp_path / "moe"
    with pytest.raises(OutputError, match="No space left on device"):
        upcycle(dense, out, UpcycleConfig(num_experts=4, top_k=2))
    assert not out.exists() and leftovers(tmp_path, "moe") == []


def test_full_disk_during_overwrite_keeps_the_old_output(dense, tmp_path, monkeypatch):
    out = tmp_path / "moe"
    upcycle(dense, out, UpcycleConfig(num_experts=4, top_k=2, verify=False))
    before = snapshot(out)
    monkeypatch.setattr(
        ShardWriter, "_write_bytes", lambda self, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    with pytest.raises(OutputError):
        upcycle(dense, out, UpcycleConfig(num_experts=8, top_k=2, overwrite=True))
    assert snapshot(out) == before and leftovers(tmp_path, "moe") == []


def test_interrupted_run_leaves_nothing(dense, tmp_path, monkeypatch):
    calls = []

    def interrupt(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", interrupt)
    with pytest.raises(KeyboardInterrupt):
        upcycle(dense, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2))
    assert not (tmp_path / "moe").exists() and leftovers(tmp_path, "moe") == []


def test_failed_verification_of_an_exact_recipe_keeps_no_output(dense, tmp_path, monkeypatch):
    from converters.verify import Verification

    bad = Verification(1.0, 0.5, 0.5, 64, 3, 2, 48, 1e-4, False)
    monkeypatch.setattr(upcycle_module, "verify_folders", lambda *a, **k: bad)
    with pytest.raises(VerificationError, match="differs from"):
        upcycle(dense, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2))
    assert not (tmp_path / "moe").exists()


# -- bad input -----------------------------------------------------------------------------------
def copy_src(dense, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dense, src)
    return src


def test_malformed_config_is_refused(dense, tmp_path):
    src = copy_src(dense, tmp_path)
    (src / "config.json").write_text("{not json")
    with pytest.raises(MoEConfigError, match="config.json: not valid JSON"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))


def test_unsupported_source_names_the_reason(tmp_path):
    from transformers import GemmaConfig

    src = make_dense(
        tmp_path / "gemma",
        config=GemmaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        ),
    )
    with pytest.raises(MoEConfigError, match="Gemma scales embeddings"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))


def test_olmo2_to_olmoe_is_refused_with_the_exact_alternative(tmp_path):
    src = make_dense(tmp_path / "olmo2", "olmo2")
    with pytest.raises(MoEConfigError, match="Use --target flex_olmo"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2, target="olmoe"))


def test_llama_with_attention_bias_is_refused(tmp_path):
    cfg = source_config("llama")
    cfg.attention_bias = True
    src = make_dense(tmp_path / "llama-bias", config=cfg)
    with pytest.raises(MoEConfigError, match="attention_bias=true"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))


@pytest.mark.parametrize(
    "cfg, message",
    [(dict(num_experts=2, top_k=4), "< --top-k"), (dict(num_experts=6, top_k=3, granularity=3), "does not divide")],
)
def test_inconsistent_expert_numbers_are_refused(dense, tmp_path, cfg, message):
    with pytest.raises(MoEConfigError, match=message):
        upcycle(dense, tmp_path / "o", UpcycleConfig(**cfg))
    assert not (tmp_path / "o").exists()


def test_missing_shard_is_refused(dense, tmp_path):
    src = tmp_path / "src"
    upcycle_dense = make_dense(tmp_path / "sharded-src", "llama")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(upcycle_dense).save_pretrained(src, max_shard_size="50KB")
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} listed in model.safetensors.index.json is missing"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))


def test_truncated_shard_is_refused(dense, tmp_path):
    src = copy_src(dense, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: .*truncated"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))
    assert not (tmp_path / "o").exists()


def test_pickle_checkpoints_are_never_read(dense, tmp_path):
    src = copy_src(dense, tmp_path)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="reads only safetensors"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))


def test_weights_that_do_not_match_the_config_are_refused(dense, tmp_path):
    src = copy_src(dense, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        upcycle(src, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2))


# -- dry run -------------------------------------------------------------------------------------
def test_dry_run_reads_no_weights_and_predicts_the_real_run(dense, tmp_path, monkeypatch, capsys):
    cfg = UpcycleConfig(num_experts=8, top_k=2, granularity=2)
    with monkeypatch.context() as m:
        m.setattr(DenseCheckpoint, "read", lambda *a, **k: pytest.fail("dry run read a tensor"))
        assert (
            main(["upcycle", str(dense), str(tmp_path / "o"), "--num-experts", "8", "--granularity", "2", "--dry-run"])
            == 0
        )
        plan = plan_upcycle(dense, cfg)
        plan.weights.close()
    printed = capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    report = upcycle(dense, tmp_path / "o", cfg)
    assert f"total {report.total_params:,}, active per token {report.active_params:,}" in printed
    assert (plan.total_params, plan.active_params) == (report.total_params, report.active_params)
    data_bytes = 0
    with safe_open(tmp_path / "o" / "model.safetensors", "pt") as f:
        data_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert plan.output_bytes == data_bytes
    assert plan.predicted_peak_rss > plan.baseline_rss > 0


# -- CLI and Hub ---------------------------------------------------------------------------------
def test_cli_upcycles_and_records_the_command_line(dense, tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["upcycle", str(dense), str(out), "--num-experts", "4", "--top-k", "2", "--seed", "3"]
    assert main(argv) == 0
    report = json.loads((out / "upcycle_report.json").read_text())
    assert report["argv"] == ["moe-patch", *argv[:3], "--num-experts", "4", "--top-k", "2", "--seed", "3"]
    assert report["command_line"].startswith("moe-patch upcycle ")
    assert "MixtralForCausalLM written to" in capsys.readouterr().out


def test_cli_prints_one_clear_line_for_bad_input(dense, tmp_path, capsys):
    rc = main(["upcycle", str(dense), str(tmp_path / "o"), "--num-experts", "2", "--top-k", "4"])
    err = capsys.readouterr().err
    assert rc == 1 and "error: --num-experts 2 < --top-k 4" in err and "Traceback" not in err


def test_push_to_hub_calls_hub_scripts_after_success(dense, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("hub_scripts.push")
    fake.push_folder = lambda folder, repo_id, **kw: calls.append((folder, repo_id, kw)) or f"https://hub/{repo_id}"
    monkeypatch.setitem(sys.modules, "hub_scripts.push", fake)
    out = tmp_path / "moe"
    argv = [
        "upcycle",
        str(dense),
        str(out),
        "--num-experts",
        "4",
        "--no-verify",
        "--push-to-hub",
        "me/moe",
        "--private",
    ]
    assert main(argv) == 0
    assert calls == [(out, "me/moe", {"private": True, "commit_message": None})]


def test_push_to_hub_with_a_broken_hub_module_fails_loudly_before_converting(dense, tmp_path, monkeypatch, capsys):
    """hub_scripts ships with moe-patch: a module of it that cannot be imported is a bug to show (one line, an
    internal error that --debug explains), not an extra to install; it is found before hours of conversion."""
    monkeypatch.setitem(sys.modules, "hub_scripts.push", None)  # import fails
    out = tmp_path / "moe"
    assert main(["upcycle", str(dense), str(out), "--num-experts", "4", "--push-to-hub", "me/moe"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moe-patch upcycle: internal error: ModuleNotFoundError: import of hub_scripts.push"), err
    assert err.count("\n") == 1
    assert not out.exists()


def test_keyword_api_records_the_equivalent_command_line(dense, tmp_path):
    # hub_scripts' batch runner calls upcycle(source, output, **recipe)
    report = upcycle(dense, tmp_path / "moe", num_experts=4, top_k=2, granularity=2, verify=False)
    assert report.argv == [
        "moe-patch",
        "upcycle",
        str(dense),
        str(tmp_path / "moe"),
        "--num-experts",
        "4",
        "--top-k",
        "2",
        "--granularity",
        "2",
        "--no-verify",
    ]
    assert report.verification is None
    with pytest.raises(TypeError):
        upcycle(dense, tmp_path / "x", UpcycleConfig(num_experts=4), top_k=2)


@pytest.mark.parametrize(
    "content, message",
    [("5 7 900", r"token ids must lie in \[0, 128\)"), ("", "no tokens")],
)
def test_bad_calibration_files_are_refused_before_writing(dense, tmp_path, content, message):
    calib = tmp_path / "calib.ids"
    calib.write_text(content)
    with pytest.raises(MoEConfigError, match=message):
        upcycle(dense, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=2, router_init="kmeans", calibration=calib))
    assert not (tmp_path / "o").exists()


def test_conflicting_expert_sources_are_refused(dense, tmp_path):
    with pytest.raises(MoEConfigError, match="alternatives"):
        upcycle(dense, tmp_path / "o", UpcycleConfig(top_k=1, experts_from=[dense], lora_experts=[dense]))
    with pytest.raises(MoEConfigError, match="2 expert sources x 1 slices give 2 experts"):
        upcycle(dense, tmp_path / "o", UpcycleConfig(num_experts=4, top_k=1, experts_from=[dense, dense]))


def test_large_unchanged_tensors_are_streamed_in_row_blocks_with_identical_bytes(dense, tmp_path, monkeypatch):
    cfg = dict(num_experts=4, top_k=2, verify=False)
    upcycle(dense, tmp_path / "whole", UpcycleConfig(**cfg))
    reads = []
    original = DenseCheckpoint.read
    monkeypatch.setattr(
        DenseCheckpoint,
        "read",
        lambda self, key, rows=None, cols=None: reads.append((key, rows)) or original(self, key, rows, cols),
    )
    monkeypatch.setattr(upcycle_module, "COPY_BLOCK_BYTES", 1000)  # 1000 B // 128 B per row = 7 rows a block
    upcycle(dense, tmp_path / "blocks", UpcycleConfig(**cfg))
    assert sum(k == "model.embed_tokens.weight" for k, _ in reads) == -(-128 // 7)
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == (
        tmp_path / "whole" / "model.safetensors"
    ).read_bytes()
