"""transformers' quantizer for a checkpoint, in its ``dequantize=True`` mode: its weight conversions say which
stored tensors (weights, scales, blocks) make each parameter, which is how the key map finds a format's pieces.
Kept in one place so that a release that moves or changes it breaks here and nowhere else; each format's
transformers oracle is its ``reference`` method.
"""

from __future__ import annotations

from typing import Any

from ..errors import MoEConfigError


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
