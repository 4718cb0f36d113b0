"""Issue 19's quantized-checkpoint bad inputs (folded into test_bad_inputs.py once merged)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_patch
from moe_patch.errors import CheckpointError, ExpertOutputError, MoEConfigError


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_patch.cli", *args], capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- quantized checkpoints (issue 19)
def _quantized(tmp_path, name: str) -> Path:
    """A tiny packed checkpoint of tests/format_helpers' case ``name`` (bf16 twin beside it)."""
    from format_helpers import save_case

    return save_case(name, tmp_path)


def _edit_shards(path: Path, edit) -> None:
    """Rewrite every shard of ``path`` with ``edit(key, tensor) -> tensor`` (safetensors, in place)."""
    from safetensors.torch import load_file, save_file

    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({k: edit(k, t) for k, t in tensors.items()}, shard, metadata={"format": "pt"})


def _set_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in fields.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


_DROP = object()


def _poison_one(value, key_part: str, expert: int | None = None):
    """An edit that writes ``value`` into the first element of every tensor whose key contains ``key_part`` (and,
    for stacked tensors, into expert ``expert``'s row only)."""
    def edit(key, t):
        if key_part not in key:
            return t
        t = t.clone()
        flat = (t[expert] if expert is not None else t).view(-1)
        if t.dtype == torch.uint8:
            flat[0] = value
        else:
            flat[0] = float(value)
        return t
    return edit


@pytest.mark.parametrize("case,key_part,value,expert", [
    ("deepseek_v3-fp8", "experts.3.up_proj.weight_scale_inv", float("inf"), None),
    ("deepseek_v3-fp8", "experts.5.down_proj.weight_scale_inv", float("nan"), None),
    ("minimax_m2-fp8-ue8m0", "experts.2.w1.weight_scale_inv", 0xFF, None),  # e8m0's NaN code
    ("gpt_oss-mxfp4", "layers.1.mlp.experts.gate_up_proj_scales", 0xFF, 6),  # e8m0 NaN in one expert's row
    ("qwen3_moe-int4", "experts.1.gate_proj.weight_scale", float("nan"), None),
    ("qwen3_moe-metal", "experts.4.down_proj.qbiases", float("-inf"), None),
])
def test_a_non_finite_stored_scale_is_refused_naming_file_tensor_and_expert(tmp_path, case, key_part, value, expert):
    """Was: tokens silently changed or all zeros, exit 0. Checked on every read from disk (scales are a small
    fraction of an expert's bytes); the generation never completes on a corrupt expert."""
    path = _quantized(tmp_path, case)
    _edit_shards(path, _poison_one(value, key_part, expert))
    model = moe_patch.load_model(path, dtype=torch.float32, expert_cache=None)  # every expert read once
    ids = torch.arange(2, 34).reshape(4, 8) % 100 + 2
    with pytest.raises(CheckpointError, match=r"\.safetensors: tensor '[^']*" + re.escape(key_part.rsplit(".", 1)[-1])
                       + r".*non-finite") as raised:
        with torch.no_grad():
            for _ in range(8):  # enough steps that the router picks the poisoned expert on some token
                ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    if expert is not None:  # a row of a tensor that stacks every expert: the message says which
        assert f"(expert {expert})" in str(raised.value)


@pytest.mark.parametrize("qc", [_DROP, {}])
def test_a_quantized_checkpoint_without_its_quantization_config_is_refused(tmp_path, qc):
    """Was: FP8 bytes read as values, scales ignored, garbage tokens with exit 0."""
    path = _quantized(tmp_path, "deepseek_v3-fp8")
    _set_config(path, quantization_config=qc)
    with pytest.raises(MoEConfigError, match=r"tensor '.*' \(float8_e4m3fn\) is fp8-quantized but .*config\.json has no "
                       r"quantization_config"):
        moe_patch.load_model(path)
    r = _cli("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert r.returncode == 1 and "no quantization_config" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("case", ["gpt_oss-mxfp4", "qwen3_moe-int4", "qwen3_moe-metal"])
def test_other_quantized_layouts_without_their_config_are_refused_too(tmp_path, case):
    path = _quantized(tmp_path, case)
    _set_config(path, quantization_config=_DROP)
    with pytest.raises(MoEConfigError, match="-quantized but .* has no quantization_config"):
        moe_patch.load_model(path)


@pytest.mark.parametrize("qc", ["fp8", ["fp8"], 3, True])
def test_a_quantization_config_that_is_not_an_object_is_one_line(tmp_path, qc):
    """Was: internal error: AttributeError ('str' object has no attribute 'to_dict')."""
    path = _quantized(tmp_path, "deepseek_v3-fp8")
    _set_config(path, quantization_config=qc)
    with pytest.raises(MoEConfigError, match="quantization_config must be a JSON object"):
        moe_patch.load_model(path)
    r = _cli("inspect", str(path))
    assert r.returncode == 1 and "quantization_config must be a JSON object" in r.stderr


def test_an_expert_whose_weights_hold_nan_is_named_with_its_layer(tmp_path):
    """bf16 experts carry no scales to check on read; the engine checks each layer's output (riding on the next
    layer's one host transfer) and names the expert that turned finite inputs into NaN."""
    from offload_helpers import save_tiny

    path = save_tiny("qwen3_moe", tmp_path / "nan")
    _edit_shards(path, lambda k, t: torch.full_like(t, float("nan")) if "layers.1.mlp.experts." in k
                 and k.endswith("down_proj.weight") else t)
    model = moe_patch.load_model(path, dtype=torch.float32)
    with pytest.raises(ExpertOutputError, match=r"model\.layers\.1\.mlp\.experts: expert \d+ turns finite inputs into "
                       r"NaN"):
        with torch.no_grad():
            model(torch.tensor([[3, 4, 5, 6]]))
