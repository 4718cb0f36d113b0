"""Pack saved random-weight checkpoints into the quantized formats of the big MoE releases.

For tests and benchmarks (nothing here runs in a user's model): a bf16/fp32 checkpoint written by
``save_pretrained`` is rewritten, tensor by tensor, as

- block-wise FP8 (DeepSeek-V3 / Qwen3-FP8 / MiniMax-M2): ``weight`` in float8_e4m3fn and a
  ``weight_scale_inv`` per ``weight_block_size`` block (float32, or e8m0 exponent bytes for
  ``scale_fmt="ue8m0"``), also per-channel (``[out, 1]``) and per-tensor scales;
- MXFP4 (gpt-oss): fused ``experts.{gate_up,down}_proj`` become ``_blocks`` (two e2m1 values per byte,
  low nibble first) and ``_scales`` (one e8m0 exponent per 32 inputs);
- compressed-tensors: ``pack-quantized`` int4 groups (``weight_packed``/``weight_scale``/``weight_shape``,
  packed with the compressed-tensors library's own ``pack_to_int32``) or ``float-quantized`` FP8 with
  per-channel scales.

The config gets the ``quantization_config`` the real releases carry. Tests check that the output
round-trips through transformers' own dequantize functions (``tests/formats/test_offload_formats.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0  # largest finite float8_e4m3fn
#: e2m1 magnitudes by code 0..7 (codes 8..15 are their negatives), as in transformers' FP4_VALUES
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: tensors no release quantizes: embeddings, the LM head and routers (their precision decides routing)
NOT_QUANTIZED = (
    "embed_tokens.weight",
    "lm_head.weight",
    "mlp.gate.weight",
    "block_sparse_moe.gate.weight",
    "router.weight",
    "shared_expert_gate.weight",
)


# --------------------------------------------------------------------------- pure quantizers
def quantize_fp8_block(
    w: torch.Tensor, block: tuple[int, int] | None, scale_fmt: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> (float8_e4m3fn weight, scale) with ``w ~= q * scale`` per block.

    ``block=None`` gives one scale per output channel (``[out, 1]``); ``(out, in)`` one per tensor.
    ``scale_fmt="ue8m0"`` rounds scales up to powers of two and stores their biased exponents as uint8.
    """
    w = w.float()
    rows, cols = w.shape
    b0, b1 = block if block is not None else (1, cols)
    gr, gc = math.ceil(rows / b0), math.ceil(cols / b1)
    padded = torch.zeros(gr * b0, gc * b1)
    padded[:rows, :cols] = w
    amax = padded.view(gr, b0, gc, b1).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (padded.view(gr, b0, gc, b1) / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(gr * b0, gc * b1)[:rows, :cols].to(torch.float8_e4m3fn)
    if scale_fmt == "ue8m0":
        return q, (torch.log2(scale).round() + 127).to(torch.uint8)
    return q, scale


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., out, in]`` (in a multiple of 32) -> (blocks uint8 ``[..., out, in/32, 16]``, scales uint8
    ``[..., out, in/32]``): e2m1 codes two per byte (element 2j in the low nibble), e8m0 exponents."""
    *lead, out, n_in = w.shape
    if n_in % 32:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of 32, got {n_in}")
    if lead:  # one matrix at a time: the fp32 temporaries of a whole [E, out, in] stack can be tens of GB
        pairs = [quantize_mxfp4(m) for m in w.reshape(-1, out, n_in)]
        blocks = torch.stack([b for b, _ in pairs]).reshape(*lead, out, n_in // 32, 16)
        return blocks, torch.stack([s for _, s in pairs]).reshape(*lead, out, n_in // 32)
    g = w.float().reshape(out, n_in // 32, 32)
    amax = g.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.zeros_like(amax)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)
    # nearest e2m1 magnitude: the midpoints between neighbouring codes
    mids = torch.tensor([(a + b) / 2 for a, b in zip(FP4_MAGNITUDES, FP4_MAGNITUDES[1:])])
    code = torch.bucketize(scaled.abs().contiguous(), mids)
    code = torch.where((scaled < 0) & (code > 0), code + 8, code).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


def quantize_int_group(w: torch.Tensor, bits: int = 4, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization per group of ``group_size`` inputs: (int8 codes, scales in w's dtype)."""
    out, n_in = w.shape
    g = w.float().reshape(out, n_in // group_size, group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(-1) / qmax).clamp(min=1e-8).to(w.dtype)
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(out, n_in), scale


# --------------------------------------------------------------------------- checkpoint rewriting
Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _rewrite(src: Path, dst: Path, transform: Transform, quantization_config: dict) -> Path:
    """Rewrite ``src`` shard by shard (memory: one shard) into ``dst`` with ``quantization_config``; a
    single-file checkpoint is split in two shards so the result always has an index. Other files
    (generation config, tokenizer) are copied as they are."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shards = sorted(src.glob("*.safetensors"))
    weight_map: dict[str, str] = {}
    total = 0
    for n, shard in enumerate(shards):
        out = transform(load_file(shard))
        keys = sorted(out)
        parts = [keys[: len(keys) // 2], keys[len(keys) // 2 :]] if len(shards) == 1 else [keys]
        for k, part in enumerate(parts):
            name = f"model-{n + k + 1:05d}-of-{max(len(shards), len(parts)):05d}.safetensors"
            save_file({key: out[key].contiguous() for key in part}, dst / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in out.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return dst


def _quantizable(key: str, t: torch.Tensor, skip: tuple[str, ...]) -> bool:
    return key.endswith(".weight") and t.dim() == 2 and t.is_floating_point() and not key.endswith(skip)


def _per_weight(skip: tuple[str, ...], quantize: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> Transform:
    """A shard transform that replaces every quantizable weight by what ``quantize(key, weight)`` returns (the
    weight's stored tensors by name) and keeps every other tensor."""

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            out.update(quantize(key, t) if _quantizable(key, t, skip) else {key: t})
        return out

    return transform


def pack_fp8(
    src: str | Path,
    dst: str | Path,
    *,
    block_size: tuple[int, int] | None = (128, 128),
    scale_fmt: str = "float",
    per_tensor: bool = False,
    skip: tuple[str, ...] = NOT_QUANTIZED,
) -> Path:
    """Rewrite a saved checkpoint as fine-grained FP8 (``quant_method: fp8``).

    Every 2-D linear weight except ``skip`` becomes float8_e4m3fn plus ``weight_scale_inv``: per
    ``block_size`` block, per output channel (``block_size=None``), or per tensor (``per_tensor``).
    """

    def quantize(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_fp8_block(t, tuple(t.shape) if per_tensor else block_size, scale_fmt)
        return {key: q, key[: -len("weight")] + "weight_scale_inv": scale.reshape(()) if per_tensor else scale}

    qc = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(block_size) if block_size is not None and not per_tensor else None,
    }
    if scale_fmt != "float":
        qc["scale_fmt"] = scale_fmt
    return _rewrite(Path(src), Path(dst), _per_weight(skip, quantize), qc)


def mxfp4_config() -> dict:
    """The quantization_config of the gpt-oss releases."""
    return {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }


def pack_mxfp4(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a saved gpt-oss checkpoint with MXFP4 experts, as the gpt-oss releases store them."""

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                # the model holds [E, in, out]; the checkpoint stores [E, out, in/32, 16] blocks
                blocks, scales = quantize_mxfp4(t.transpose(1, 2))
                out[key + "_blocks"], out[key + "_scales"] = blocks, scales
            else:
                out[key] = t
        return out

    return _rewrite(Path(src), Path(dst), transform, mxfp4_config())


def pack_compressed_tensors(
    src: str | Path,
    dst: str | Path,
    *,
    scheme: str = "int4",
    group_size: int = 32,
    skip: tuple[str, ...] = NOT_QUANTIZED,
    experts_only: bool = False,
) -> Path:
    """Rewrite a saved checkpoint in compressed-tensors format.

    ``scheme="int4"``: ``pack-quantized`` symmetric int4 per ``group_size`` inputs (the Kimi-K2-Thinking
    layout); ``"fp8"``: ``float-quantized`` FP8 with per-channel scales. ``experts_only`` quantizes the
    routed experts and leaves attention unquantized (mixed-precision releases).
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    def transform(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if not _quantizable(key, t, skip) or (experts_only and ".experts." not in key):
                out[key] = t
                continue
            base = key[: -len("weight")]
            if scheme == "int4":
                q, scale = quantize_int_group(t, 4, group_size)
                out[base + "weight_packed"] = pack_to_int32(q, 4)
                out[base + "weight_scale"] = scale
                out[base + "weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
            else:
                q, scale = quantize_fp8_block(t, None)
                out[base + "weight"], out[base + "weight_scale"] = q, scale.to(t.dtype)
        return out

    if scheme == "int4":
        weights = {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": group_size,
            "dynamic": False,
            "observer": "minmax",
        }
        fmt = "pack-quantized"
    else:
        weights = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "channel",
            "dynamic": False,
            "observer": "minmax",
        }
        fmt = "float-quantized"
    targets = ["re:.*experts.*"] if experts_only else ["Linear"]
    ignore = ["lm_head"] + [f"re:.*{s.removesuffix('.weight')}$" for s in skip if s != "lm_head.weight"]
    qc = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": targets,
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": fmt,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }
    return _rewrite(Path(src), Path(dst), transform, qc)


def pack_metal(
    src: str | Path, dst: str | Path, *, bits: int = 4, group_size: int = 32, skip: tuple[str, ...] = NOT_QUANTIZED
) -> Path:
    """Rewrite a saved checkpoint in transformers' Metal (MLX affine) format: every 2-D linear weight except
    ``skip`` becomes ``bits``-bit codes packed in uint32 with a ``scales`` and ``qbiases`` per ``group_size``
    inputs, quantized by transformers' own ``_affine_quantize_tensor``."""
    from transformers.integrations.metal_quantization import _affine_quantize_tensor

    def quantize(key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, scales, biases = _affine_quantize_tensor(t, group_size, bits)
        base = key[: -len("weight")]
        return {key: packed, base + "scales": scales.to(t.dtype), base + "qbiases": biases.to(t.dtype)}

    qc = {"quant_method": "metal", "bits": bits, "group_size": group_size, "modules_to_not_convert": ["lm_head"]}
    return _rewrite(Path(src), Path(dst), _per_weight(skip, quantize), qc)
