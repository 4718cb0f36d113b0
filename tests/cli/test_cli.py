"""The `moe-patch` command: inspect from config + index only, clear one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from moe_patch.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real (tiny) Qwen3-MoE safetensors checkpoint with per-expert tensors, as on the Hub."""
    from moe_patch.testing.tiny import tiny_model

    model, _ = tiny_model("qwen3_moe")
    path = tmp_path_factory.mktemp("ckpt") / "qwen3-moe-tiny"
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def test_inspect_prints_the_moe_table_from_a_checkpoint_folder(checkpoint, capsys):
    assert main(["inspect", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "Qwen3MoeForCausalLM" in out and "model.layers.0.mlp.experts" in out
    assert "per-expert tensors" in out and "safetensors shards" in out


def test_inspect_json_is_machine_readable(checkpoint, capsys):
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_moe_blocks"] == 2 and data["blocks"][0]["top_k"] == 2
    assert data["checkpoint"]["shards"] > 1 and data["total_params"] > data["active_params"]


def test_inspect_reads_no_weights(checkpoint, monkeypatch, capsys):
    """Only config.json and the index are read: tensor data never is."""
    import safetensors

    def refuse(*args, **kwargs):
        raise AssertionError("inspect opened a safetensors file")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert main(["inspect", str(checkpoint)]) == 0


def test_inspect_handles_a_full_size_deepseek_v3_config_without_weights(tmp_path, capsys):
    from transformers import DeepseekV3Config

    DeepseekV3Config().save_pretrained(tmp_path)  # 671 B parameters, no tensors on disk
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_moe_blocks"] == 58 and 660e9 < data["total_params"] < 690e9
    assert data["blocks"][0]["num_experts"] == 256 and data["blocks"][0]["top_k"] == 8


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 8},
            "num_experts_per_tok = 8 exceeds",
        ),
        (
            {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": "64 2"},
            "must be an integer, got '64 2'",
        ),
        ({"hidden_size": 8}, "no 'model_type' field"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_configs_give_one_clear_line_and_exit_code_1(tmp_path, capsys, config, message):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_config_is_reported(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 1
    assert "config.json: not found" in capsys.readouterr().err


def test_remote_code_is_refused_unless_asked(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "deepseek_v2_custom", "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}}
        )
    )
    assert main(["inspect", str(tmp_path)]) == 1
    assert "--trust-remote-code" in capsys.readouterr().err


def test_demo_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(precious)]) == 1
    assert (precious / "notes.txt").read_text() == "keep me"
    assert "was not written by `moe-patch demo`" in capsys.readouterr().err


def test_inspect_prints_a_memory_plan_for_budgets(tmp_path, capsys):
    from transformers import DeepseekV3Config

    DeepseekV3Config(dtype="bfloat16").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--gpu", "80GiB", "--ram", "256GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plan["bytes_per_param"] == 2 and plan["fits"]
    # 58 MoE layers x top-8 experts x 3 x 7168 x 2048 bf16 weights: DESIGN.md's 41 GB per token
    assert plan["routed_bytes_per_token"] == 58 * 8 * 3 * 7168 * 2048 * 2
    assert plan["device_expert_bytes"] + plan["host_expert_bytes"] + plan["disk_expert_bytes"] == plan["expert_bytes"]
    assert plan["host_expert_bytes"] == 256 * 2**30
    # the context: the model's 4096 tokens (at most 4096 by default); its KV cache as transformers keeps it for
    # DeepSeek-V3 (one 512-wide latent and a 64-wide rotary key per token and layer, bf16), then its activations
    assert plan["context_tokens"] == 4096 and plan["kv_exact"]
    assert plan["kv_cache_bytes"] == 61 * 4096 * (512 + 64) * 2
    assert (
        plan["device_expert_bytes"]
        == int(80 * 2**30 * 0.9) - plan["non_expert_bytes"] - plan["kv_cache_bytes"] - plan["activation_bytes"]
        > 0
    )
    assert 0 < plan["hit_rate_low"] < plan["hit_rate_high"] < 1


def test_the_memory_plan_keeps_the_kv_cache_of_the_context_asked_for(tmp_path, capsys):
    from transformers import DeepseekV3Config

    DeepseekV3Config(dtype="bfloat16").save_pretrained(tmp_path)
    plans = {}
    for ctx in ("1024", "2048"):
        assert main(["inspect", str(tmp_path), "--gpu", "80GiB", "--ctx-size", ctx, "--json"]) == 0
        plans[ctx] = json.loads(capsys.readouterr().out)["memory_plan"]
    assert plans["2048"]["kv_cache_bytes"] == 2 * plans["1024"]["kv_cache_bytes"] > 0
    assert plans["2048"]["activation_bytes"] > plans["1024"]["activation_bytes"]
    assert plans["2048"]["device_expert_bytes"] < plans["1024"]["device_expert_bytes"]
    assert main(["inspect", str(tmp_path), "--gpu", "80GiB", "--ctx-size", "8192"]) == 1
    assert "--ctx-size 8192: the model's context is 4096 tokens" in capsys.readouterr().err


def test_memory_plan_says_when_the_non_expert_weights_do_not_fit(tmp_path, capsys):
    from transformers import DeepseekV3Config

    DeepseekV3Config(dtype="bfloat16").save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--gpu", "24GiB"]) == 0
    assert "do not fit the device budget 24.00 GiB" in capsys.readouterr().out


# -- the command-line layer: every command registered, a broken module seen, the shared types alone ----------
COMMANDS = {"demo", "inspect", "run", "serve", "chat", "upcycle", "push", "pull", "batch"}


def _subcommands(parser) -> set[str]:
    import argparse

    return {
        name for action in parser._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices
    }


def test_every_command_module_of_the_layer_is_registered():
    """A command module that defines register() but is left out of the parser is a command users never see."""
    import importlib
    import pkgutil

    import moe_patch.cli
    from moe_patch.cli import entry

    modules = {m.name for m in pkgutil.iter_modules(moe_patch.cli.__path__) if m.name != "__main__"}
    with_register = {m for m in modules if hasattr(importlib.import_module(f"moe_patch.cli.{m}"), "register")}
    assert with_register == {m.__module__.rsplit(".", 1)[1] for m in entry._registrars()}
    assert _subcommands(entry.build_parser()) == COMMANDS


def test_a_broken_command_module_fails_loudly_instead_of_removing_its_command(monkeypatch):
    """No `except ImportError: pass`: a module of the layer that cannot be imported stops every command with its
    ImportError, where it used to drop `moe-patch run` silently."""
    import sys

    import moe_patch.cli

    monkeypatch.setitem(sys.modules, "moe_patch.cli.run", None)  # `import moe_patch.cli.run` now fails
    monkeypatch.delattr(moe_patch.cli, "run", raising=False)
    with pytest.raises(ImportError, match="moe_patch.cli.run"):
        main(["inspect", "--help"])


def test_the_shared_argument_types_import_without_any_command_and_the_parser_without_torch():
    import subprocess
    import sys

    code = """
import sys
import moe_patch.cli.args
alone = sorted(m for m in sys.modules if m.startswith("moe_patch.cli."))
from moe_patch.cli import entry
entry.build_parser()
heavy = sorted(m for m in ("torch", "transformers", "huggingface_hub", "converters", "hub_scripts") if m in sys.modules)
print(alone, heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['moe_patch.cli.args'] []"  # `moe-patch --help` loads no model library


def test_a_command_whose_extra_is_missing_is_still_listed_and_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    from moe_patch.cli import entry

    assert "serve" in _subcommands(entry.build_parser())
    assert main(["serve", "some/model"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "moe-patch serve: error: serving needs uvicorn, which is not installed: "
        "pip install uvicorn (or, in moe-patch's repository, the serve extra: pip install '.[serve]')\n"
    )
