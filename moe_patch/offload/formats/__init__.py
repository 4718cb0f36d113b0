"""Quantized checkpoint formats the offload engine pages in their stored bytes (FP8, MXFP4, compressed-tensors).

- :mod:`.spec`: what ``quantization_config`` says (the one place that reads and checks it);
- :mod:`.decode`: vectorised dequantization, pure tensor functions;
- :mod:`.stored`: one expert's stored tensors and the layout that decodes them;
- :mod:`.hf`: transformers' quantizer and dequantize functions (the oracle), wrapped in one module.
"""

from .spec import SUPPORTED_METHODS, QuantizationSpec, WeightScheme, read_quantization_config
from .stored import Piece, StoredLayout, StoredTensor

__all__ = ["SUPPORTED_METHODS", "Piece", "QuantizationSpec", "StoredLayout", "StoredTensor", "WeightScheme",
           "read_quantization_config"]
