"""Weight formats: how experts are stored (on disk, or in a cache) and decoded. One file per format and
this registry; nothing outside a format's file switches on its name.

    FORMATS["fp8"]                              # a Format: read_config, pieces, decode, reference...
    read_quantization_config(config.quantization_config) -> QuantizationSpec | None
    format_of_op(op)                            # the format whose transformers dequantize op this is

A new format is a subclass of :class:`Format` in a file of its own, and one entry in ``_REGISTERED``.
"""

from __future__ import annotations

from typing import Any

from ..errors import MoEConfigError
from .base import Format, Piece, QuantizationSpec, StoredPart, WeightScheme
from .bnb import INT8, NF4
from .cast import CAST
from .compressed import COMPRESSED_TENSORS
from .fp8 import FP8
from .metal import METAL
from .mxfp4 import MXFP4
from .stored import StoredLayout, StoredTensor, materialize, nbytes_of, tensors_of

#: the registry, in the order errors list them
_REGISTERED: tuple[Format, ...] = (FP8, MXFP4, COMPRESSED_TENSORS, METAL, CAST, NF4, INT8)

FORMATS: dict[str, Format] = {f.name: f for f in _REGISTERED}
#: checkpoint formats by ``quantization_config.quant_method``
BY_METHOD: dict[str, Format] = {f.method: f for f in _REGISTERED if f.method}
SUPPORTED_METHODS: tuple[str, ...] = tuple(BY_METHOD)
#: formats the caches can encode full-precision experts in (``quantize_experts``)
CACHE_FORMATS: tuple[str, ...] = tuple(f.name for f in _REGISTERED if f.encodes)


def _as_dict(qc: Any) -> dict[str, Any]:
    if isinstance(qc, dict):
        return dict(qc)
    if hasattr(qc, "to_dict"):
        return qc.to_dict()
    raise MoEConfigError(f"quantization_config must be a JSON object, got {type(qc).__name__}.")


def read_quantization_config(qc: Any) -> QuantizationSpec | None:
    """The :class:`QuantizationSpec` of a config's ``quantization_config`` (``None`` when absent).

    Raises :class:`MoEConfigError` naming the field for an unsupported method or a malformed field.
    """
    if qc is None or qc == {}:
        return None
    raw = _as_dict(qc)
    method = raw.get("quant_method")
    fmt = BY_METHOD.get(method) if isinstance(method, str) else None
    if fmt is None:
        shown = "(missing)" if method is None else repr(method)
        raise MoEConfigError(
            f"quantization_config.quant_method {shown} is not supported by the offload engine; supported: "
            f"{', '.join(SUPPORTED_METHODS)}. Dequantize the checkpoint to bf16 first, or load it with "
            "transformers directly."
        )
    return QuantizationSpec(method, fmt.read_config(raw), raw, fmt)


def claimed_by(key: str, dtype: Any) -> Format | None:
    """The checkpoint format a tensor of this name and dtype can only come from (None: any checkpoint)."""
    return next((f for f in _REGISTERED if f.method and f.claims(key, dtype)), None)


def format_of_op(op: Any) -> Format | None:
    """The format whose transformers dequantize operation ``op`` is (None for any other operation)."""
    name = type(op).__name__
    return next((f for f in _REGISTERED if f.hf_dequantize_op == name), None)


def cache_format(name: str | None) -> Format | None:
    """The cache format ``quantize_experts=name`` asks for (None: none), its library checked."""
    if name is None:
        return None
    fmt = FORMATS.get(name)
    if fmt is None or not fmt.encodes:
        raise MoEConfigError(f"quantize_experts={name!r}: choose one of {', '.join(CACHE_FORMATS)} or None.")
    fmt.check()
    return fmt


__all__ = [
    "CACHE_FORMATS",
    "claimed_by",
    "FORMATS",
    "Format",
    "Piece",
    "QuantizationSpec",
    "StoredLayout",
    "StoredPart",
    "StoredTensor",
    "SUPPORTED_METHODS",
    "WeightScheme",
    "cache_format",
    "format_of_op",
    "materialize",
    "nbytes_of",
    "read_quantization_config",
    "tensors_of",
]
