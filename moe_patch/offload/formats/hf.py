"""Everything moe-patch takes from transformers' (and compressed-tensors') quantization code, in one
place, so that a release that moves or changes it breaks here and nowhere else.

- :func:`make_quantizer`: transformers' own quantizer for a checkpoint, in its ``dequantize=True`` mode,
  whose weight conversions say which stored tensors (weights, scales, blocks) make each parameter.
- :func:`dequant_kind`: recognises the dequantize operation of those conversions.
- ``reference_*``: transformers' dequantize functions on one expert, the oracle the vectorised
  decoders of :mod:`.decode` are tested against bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from ...errors import MoEConfigError


def make_quantizer(raw: dict[str, Any]):
    """transformers' quantizer for a pre-quantized checkpoint, set to dequantize at load."""
    from transformers.quantizers import AutoHfQuantizer
    from transformers.quantizers.auto import AutoQuantizationConfig

    raw = dict(raw)
    try:
        qconfig = AutoQuantizationConfig.from_dict(raw)
        qconfig.dequantize = True
        quantizer = AutoHfQuantizer.from_config(qconfig, pre_quantized=True)
        quantizer.validate_environment(device_map=None)  # sets the mode flags its conversions read
        return quantizer
    except ImportError as exc:
        raise MoEConfigError(f"this checkpoint's quantization needs a package that is not installed: {exc}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise MoEConfigError(f"quantization_config is not valid for transformers: {exc}") from exc


def dequant_kind(op: Any) -> str | None:
    """``"fp8"``, ``"mxfp4"`` or ``"compressed-tensors"`` for transformers' dequantize operations."""
    name = type(op).__name__
    return {"Fp8Dequantize": "fp8", "Mxfp4Dequantize": "mxfp4",
            "CompressedTensorsDequantize": "compressed-tensors"}.get(name)


#: the suffixes a stored weight's companions carry, per method (the weight pattern ends in ".weight")
SERIALIZED_SUFFIXES = {
    "fp8": ("weight", "weight_scale_inv", "activation_scale"),
    "compressed-tensors": ("weight", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_packed",
                           "weight_shape"),
}


# --------------------------------------------------------------------------- the oracle
def reference_fp8_block(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None,
                        dtype: torch.dtype) -> torch.Tensor:
    """transformers' ragged-safe FP8 dequantization (``_dequantize_fp8_weight``) in float32, rounded to ``dtype``."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    s = scale
    if s.dtype == torch.uint8:
        s = (s.to(torch.float32) - 127.0).exp2()
    return _dequantize_fp8_weight(weight.clone(), s.to(torch.float32), block, torch.float32).to(dtype)


def reference_fp8_loader(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What ``from_pretrained(..., FineGrainedFP8Config(dequantize=True))`` does to one weight
    (``Fp8Dequantize._dequantize_one``: the block is guessed from the shapes)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=dtype)


def reference_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' ``convert_moe_packed_tensors`` on one expert (the expert dimension kept: a 2-D slice fails)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks.unsqueeze(0), scales.unsqueeze(0), dtype=dtype)[0]


def reference_compressed_int(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                             shape: tuple[int, int], scheme: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' own ``PackedQuantizationCompressor.decompress`` on one weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor(list(shape))}
    if zero_point is not None:
        state["weight_zero_point"] = zero_point
    out = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=scheme))
    return out["weight"].to(dtype)
