"""Optional nf4 / int8 storage of experts in the cache tiers, through ``bitsandbytes.functional``.

Experts are quantized once when read from disk, cached quantized (4x / 2x more experts per byte
for fp16/bf16, 8x / 4x for fp32), and dequantized to the compute dtype each time they are used.
Both formats run on CPU with bitsandbytes >= 0.45 (``quantize_4bit``/``dequantize_4bit`` and
``int8_vectorwise_quant``/``int8_vectorwise_dequant``). Only matrices are quantized; biases stay.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MoEConfigError
from .formats import StoredTensor

FORMATS = ("nf4", "int8")
NF4_BLOCKSIZE = 64


@dataclass
class QuantizedTensor:
    """One quantized weight matrix; ``dequantize()`` returns it in ``dtype`` on its device."""

    kind: str
    data: torch.Tensor
    state: Any  # bitsandbytes QuantState (nf4) or per-row scales (int8)
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        if self.kind == "nf4":
            return self.data.numel() + self.state.absmax.numel() * self.state.absmax.element_size()
        return self.data.numel() + self.state.numel() * self.state.element_size()

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantizedTensor:
        data = self.data.to(device, non_blocking=non_blocking)
        if self.kind == "nf4":
            state = copy.deepcopy(self.state)  # QuantState.to moves in place and returns None
            state.to(device)
        else:
            state = self.state.to(device, non_blocking=non_blocking)
        return QuantizedTensor(self.kind, data, state, self.shape, self.dtype)

    def pin_memory(self) -> QuantizedTensor:
        state = self.state if self.kind == "nf4" else self.state.pin_memory()
        return QuantizedTensor(self.kind, self.data.pin_memory(), state, self.shape, self.dtype)

    def dequantize(self) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        if self.kind == "nf4":
            out = bnbf.dequantize_4bit(self.data, self.state)
        else:
            out = bnbf.int8_vectorwise_dequant(self.data, self.state)
        return out.reshape(self.shape).to(self.dtype)


def check_format(kind: str | None) -> str | None:
    if kind is None:
        return None
    if kind not in FORMATS:
        raise MoEConfigError(f"quantize_experts={kind!r}: choose one of {', '.join(FORMATS)} or None.")
    # bitsandbytes' CPU backend, on a CPU with AVX512-BF16, tries at import to fetch a fused gemv_4bit kernel from the
    # Hub (kernels-community) and warns "Failed to load CPU gemm_4bit_forward" without the `kernels` package. moe-patch
    # never calls gemv_4bit (it dequantizes with dequantize_4bit, then multiplies in torch): the warning is dropped.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_unused_kernel_warning)
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise MoEConfigError("quantize_experts needs bitsandbytes: pip install bitsandbytes") from exc
    return kind


def _unused_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def quantize(t: torch.Tensor, kind: str) -> torch.Tensor | QuantizedTensor:
    """Quantize a weight matrix (>= 2-D); vectors (biases, norms) are returned unchanged."""
    if t.dim() < 2 or not t.dtype.is_floating_point:
        return t
    import bitsandbytes.functional as bnbf

    shape, dtype = tuple(t.shape), t.dtype
    mat = t.reshape(-1, shape[-1])
    if kind == "nf4":
        data, state = bnbf.quantize_4bit(mat.contiguous(), quant_type="nf4", blocksize=NF4_BLOCKSIZE)
        return QuantizedTensor("nf4", data, state, shape, dtype)
    data, scales, _ = bnbf.int8_vectorwise_quant(mat.contiguous().to(torch.float16 if dtype == torch.float64 else dtype))
    return QuantizedTensor("int8", data, scales, shape, dtype)


def nbytes_of(t: torch.Tensor | QuantizedTensor | StoredTensor) -> int:
    """Bytes a cache entry's tensor holds (quantized or stored bytes, not the decoded size)."""
    return t.nbytes if isinstance(t, (QuantizedTensor, StoredTensor)) else t.numel() * t.element_size()


def materialize(t: torch.Tensor | QuantizedTensor | StoredTensor) -> torch.Tensor:
    """The tensor to compute with, decoded where ``t`` lives."""
    return t.dequantize() if isinstance(t, (QuantizedTensor, StoredTensor)) else t


def tensors_of(t: torch.Tensor | QuantizedTensor | StoredTensor) -> list[torch.Tensor]:
    """The device tensors behind a (possibly quantized or stored) weight, for stream bookkeeping."""
    if isinstance(t, StoredTensor):
        return t.parts()
    if not isinstance(t, QuantizedTensor):
        return [t]
    if t.kind == "nf4":
        parts = [t.data, t.state.absmax, t.state.code]
        if t.state.state2 is not None:  # nested quantization of the absmax
            parts += [t.state.state2.absmax, t.state.state2.code, t.state.offset]
        return [x for x in parts if isinstance(x, torch.Tensor)]
    return [t.data, t.state]


def quantized_nbytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, kind: str) -> int:
    """Bytes one expert with these tensor ``shapes`` takes once quantized to ``kind`` (scales included)."""
    return sum(nbytes_of(quantize(torch.zeros(s, dtype=dtype), kind)) for s in shapes.values())
