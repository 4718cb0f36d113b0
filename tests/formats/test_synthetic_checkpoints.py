"""The benchmarks' synthetic checkpoints (``moe_patch.testing.synthetic``): an MXFP4 checkpoint written directly
(random blocks and scales, no bf16 twin: how the gpt-oss-120b-shaped run fits a disk) is what the gpt-oss releases
store, so transformers' own dequantized load and the offload engine compute the same model from it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moe_patch
from moe_patch.testing import synthetic


@pytest.fixture
def tiny_shape(monkeypatch):
    monkeypatch.setitem(
        synthetic.SHAPES, "gpt-oss-tiny", dict(name="gpt-oss-tiny", hidden=64, inter=64, experts=4, top_k=2, vocab=96)
    )
    return "gpt-oss-tiny"


def test_an_mxfp4_checkpoint_written_directly_loads_as_the_releases_do(tmp_path, tiny_shape):
    path = synthetic.build_checkpoint(tmp_path / "oss", 2, tiny_shape, experts="mxfp4")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4" and config["vocab_size"] == 96
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.gate_up_proj_blocks" in index
    assert not any(k.endswith("experts.gate_up_proj") for k in index)  # no bf16 experts at all
    stock = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).eval()
    engine = moe_patch.load_model(path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 60]])
    with torch.no_grad():
        want, got = stock(ids).logits, engine(ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
