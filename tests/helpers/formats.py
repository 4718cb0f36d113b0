"""Tiny quantized and fused-on-disk MoE checkpoints, and the stock-transformers oracle for each.

Every case is a small random model of a real family, saved by ``save_pretrained`` and rewritten by
``moe_patch.testing.quantized`` in the format its big releases use. The oracle is the same folder
loaded by stock ``from_pretrained`` with its dequantize option, in fp32. For FP8 with dimensions that
are not a multiple of the block, stock transformers guesses the block from the shapes and is wrong
(``Fp8Dequantize._dequantize_one``), so that case's oracle is the checkpoint dequantized with
transformers' ragged-safe ``_dequantize_fp8_weight`` and loaded as a plain fp32 checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from moe_patch.formats import FORMATS
from moe_patch.testing.quantized import pack_compressed_tensors, pack_fp8, pack_metal, pack_mxfp4
from moe_patch.testing.tiny import tiny_config

VOCAB = 128


@dataclass(frozen=True)
class FormatCase:
    """One checkpoint format: how to build it and how stock transformers loads it."""

    family: str
    config: dict[str, Any]
    pack: Callable[[Path, Path], Path] | None  # None: the bf16 checkpoint as saved (fused on disk)
    oracle: str  # "fp8", "mxfp4", "compressed", "ragged_fp8", "plain"
    notes: str = ""
    widen_router: tuple[str, ...] = field(default=("gate.weight", "router.weight", "router.layer.weight"))


CASES: dict[str, FormatCase] = {
    # DeepSeek-V3 / Kimi-K2 layout: per-expert FP8 keys, float32 block scales (block 8 keeps every tiny
    # dimension a multiple of the block, where stock transformers' own dequantize is right)
    "deepseek_v3-fp8": FormatCase(
        "deepseek_v3",
        dict(
            direct=True,
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=16,
            first_k_dense_replace=0,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        lambda s, d: pack_fp8(s, d, block_size=(8, 8)),
        "fp8",
    ),
    # Qwen3-30B-A3B-FP8 layout with an expert width (24) that is not a multiple of the 16-block
    "qwen3_moe-fp8-ragged": FormatCase(
        "qwen3_moe",
        dict(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        lambda s, d: pack_fp8(s, d, block_size=(16, 16)),
        "ragged_fp8",
    ),
    # MiniMax-M2: Mixtral-style block_sparse_moe.experts.E.w1/w2/w3 keys, ue8m0 scales as exponent bytes
    "minimax_m2-fp8-ue8m0": FormatCase(
        "minimax_m2",
        dict(
            hidden_size=32,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        lambda s, d: pack_fp8(s, d, block_size=(16, 16), scale_fmt="ue8m0"),
        "fp8",
    ),
    # gpt-oss: fused MXFP4 blocks/scales on disk, bf16 biases, interleaved gate/up
    "gpt_oss-mxfp4": FormatCase(
        "gpt_oss",
        dict(
            hidden_size=64,
            intermediate_size=64,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=16,
        ),
        pack_mxfp4,
        "mxfp4",
    ),
    # Kimi-K2-Thinking-style compressed-tensors pack-quantized int4, group 32
    "qwen3_moe-int4": FormatCase(
        "qwen3_moe",
        dict(
            hidden_size=64,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        lambda s, d: pack_compressed_tensors(s, d, scheme="int4", group_size=32),
        "compressed",
    ),
    # GLM-4.7-FP8-style compressed-tensors float-quantized FP8 (per channel) on the experts only
    "mixtral-ct-fp8": FormatCase(
        "mixtral",
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        lambda s, d: pack_compressed_tensors(s, d, scheme="fp8", experts_only=True),
        "compressed",
    ),
    # transformers' Metal (MLX affine) uint4 with a scale and a bias per 32 inputs, on every linear
    "qwen3_moe-metal": FormatCase(
        "qwen3_moe",
        dict(
            hidden_size=64,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        lambda s, d: pack_metal(s, d, bits=4, group_size=32),
        "metal",
    ),
    # Llama 4: experts fused in the checkpoint ([E, H, 2I] / [E, I, H]), bf16
    "llama4-fused": FormatCase(
        "llama4_text",
        dict(
            hidden_size=32,
            intermediate_size=32,
            intermediate_size_mlp=64,
            num_local_experts=8,
            num_experts_per_tok=1,
            head_dim=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        None,
        "plain",
    ),
    # DBRX: experts stacked along the rows of 2-D w1/v1/w2 [E * F, H]
    "dbrx-flat": FormatCase("dbrx", dict(d_model=32), None, "plain"),
}


#: checkpoints with FP8 blocks the CPU kernels read (32 columns and more; the tiny ones above use 8 and 16), for
#: the kernel tests: Qwen3-30B-A3B-FP8's layout, the expert width (48) ragged against the 32-block
KERNEL_CASES: dict[str, FormatCase] = {
    "qwen3_moe-fp8-block32": FormatCase(
        "qwen3_moe",
        dict(
            hidden_size=64,
            intermediate_size=64,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        lambda s, d: pack_fp8(s, d, block_size=(32, 32)),
        "ragged_fp8",
    ),
}
ALL_CASES = {**CASES, **KERNEL_CASES}


def _build(case: FormatCase, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    fields = dict(case.config)
    common = dict(num_hidden_layers=2, vocab_size=VOCAB, tie_word_embeddings=False)
    if fields.pop("direct", False):  # the family's own defaults, not the generic shrinker's (MLA rope dims)
        cfg = transformers.AutoConfig.for_model(case.family, max_position_embeddings=4096, **common, **fields)
    else:
        cfg = tiny_config(case.family, **common, **fields)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init is small; widen the routers so routing is far from ties
        for name, p in model.named_parameters():
            if name.endswith(case.widen_router) and p.dim() == 2:
                p.normal_(0, 1.0)
            elif p.dim() >= 2:
                p.normal_(0, 0.05)
    return model.eval()


def save_case(name: str, root: Path) -> Path:
    """Build case ``name``, save it in bf16 and pack it; returns the checkpoint folder."""
    case = ALL_CASES[name]
    bf16 = root / f"{name}-bf16"
    _build(case).to(torch.bfloat16).save_pretrained(bf16)
    if case.pack is None:
        return bf16
    return case.pack(bf16, root / name)


def _dequantized_copy(src: Path, dst: Path, block: tuple[int, int]) -> Path:
    """The FP8 checkpoint ``src`` dequantized with transformers' ragged-safe function, as plain fp32."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for key, t in tensors.items():
        if key.endswith("weight_scale_inv"):
            continue
        scale = tensors.get(key[: -len("weight")] + "weight_scale_inv")
        out[key] = FORMATS["fp8"].reference(t, scale, list(block), torch.float32) if scale is not None else t.float()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def load_oracle(name: str, path: Path) -> torch.nn.Module:
    """Stock transformers' fp32 model for the checkpoint at ``path`` (see the module docstring)."""
    case = ALL_CASES[name]
    auto = transformers.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if case.oracle == "fp8":
        kwargs["quantization_config"] = transformers.FineGrainedFP8Config(dequantize=True)
    elif case.oracle == "mxfp4":
        kwargs["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
    elif case.oracle == "metal":  # its quantizer places the model on Apple's GPU unless told otherwise
        kwargs.update(quantization_config=transformers.MetalConfig(dequantize=True), device_map="cpu")
    elif case.oracle == "compressed":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    elif case.oracle == "ragged_fp8":
        block = tuple(json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"])
        path = _dequantized_copy(path, path.parent / f"{name}-oracle", block)
    # stock FP8 loading leaves the checkpoint's unquantized bf16 tensors in bf16: upcast them (exact)
    return auto.from_pretrained(path, **kwargs).float().eval()
