"""nf4 / int8 experts in the caches (``quantize_experts``), through ``bitsandbytes.functional``.

Experts of an unquantized checkpoint are encoded once when read (4x / 2x more experts per byte for
fp16/bf16, 8x / 4x for fp32) and decoded to the compute dtype each time they are used. Both run on CPU with
bitsandbytes >= 0.45 (``quantize_4bit``/``dequantize_4bit``, ``int8_vectorwise_quant``/``_dequant``). Only
matrices (2-D) are encoded; vectors (biases) stay as they are. The encoded tensors are a
:class:`~moe_patch.formats.stored.StoredTensor` like a checkpoint's stored bytes: one kind of compact
tensor for every cache.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import MoEConfigError
from .base import Format, Piece, WeightScheme
from .stored import StoredLayout, StoredTensor, nbytes_of

NF4_BLOCKSIZE = 64


def _bnb():
    # bitsandbytes' CPU backend, on a CPU with AVX512-BF16, tries at import to fetch a fused gemv_4bit kernel from the
    # Hub (kernels-community) and warns "Failed to load CPU gemm_4bit_forward" without the `kernels` package. moe-patch
    # never calls gemv_4bit (it dequantizes with dequantize_4bit, then multiplies in torch): the warning is dropped.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_unused_kernel_warning)
    try:
        import bitsandbytes.functional as bnbf
    except ImportError as exc:  # pragma: no cover - bitsandbytes is a dependency
        raise MoEConfigError("quantize_experts needs bitsandbytes: pip install bitsandbytes") from exc
    return bnbf


def _unused_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


class _BnbFormat(Format):
    encodes = True

    def check(self) -> None:
        """bitsandbytes is importable (checked at attach, before anything is changed)."""
        _bnb()

    def encode(self, tensor: torch.Tensor) -> torch.Tensor | StoredTensor:
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            return tensor  # an expert's matrices are 2-D; vectors (biases) are not worth a scale each
        rows, cols = tensor.shape
        piece = Piece(self, 0, 1, rows=rows, cols=cols)
        layout = StoredLayout((piece,), self.scheme, (rows, cols), tensor.dtype)
        return StoredTensor(layout, self._quantize(tensor.contiguous()))

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes one tensor of ``shape`` takes once encoded (scales included)."""
        return nbytes_of(self.encode(torch.zeros(shape, dtype=dtype)))

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        raise NotImplementedError  # sized by encoded_nbytes: depends on the model dtype's row scales

    @property
    def scheme(self) -> WeightScheme:
        return WeightScheme(self.name)

    def _quantize(self, mat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class Nf4Format(_BnbFormat):
    """4-bit NormalFloat codes with an absmax per block of 64 (QLoRA's format)."""

    name = "nf4"

    def _quantize(self, mat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        data, state = _bnb().quantize_4bit(mat, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
        return (data, state.absmax)

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        bnbf = _bnb()
        data, absmax = tensors[piece.weight], tensors[piece.scale]
        state = bnbf.QuantState(
            absmax=absmax,
            shape=torch.Size((piece.rows, piece.cols)),
            code=bnbf.get_4bit_type("nf4", device=data.device),
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=out.dtype if out.dtype != torch.float64 else torch.float32,
        )
        out.copy_(bnbf.dequantize_4bit(data, state).reshape(out.shape))

    def describe(self, scheme: WeightScheme) -> str:
        return f"nf4 (bitsandbytes, absmax per {NF4_BLOCKSIZE})"

    def reference(self, tensor: torch.Tensor, **_: Any) -> torch.Tensor:
        """bitsandbytes' own round trip (its QuantState object, not rebuilt from our stored tensors)."""
        bnbf = _bnb()
        mat = tensor.reshape(-1, tensor.shape[-1]).contiguous()
        data, state = bnbf.quantize_4bit(mat, quant_type="nf4", blocksize=NF4_BLOCKSIZE)
        return bnbf.dequantize_4bit(data, state).reshape(tensor.shape).to(tensor.dtype)


class Int8Format(_BnbFormat):
    """int8 per row with a float32 absmax scale (LLM.int8()'s vector-wise quantization)."""

    name = "int8"

    def _quantize(self, mat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        data, scales, _ = _bnb().int8_vectorwise_quant(mat.to(torch.float16) if mat.dtype == torch.float64 else mat)
        return (data, scales)

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        out.copy_(_bnb().int8_vectorwise_dequant(tensors[piece.weight], tensors[piece.scale]).reshape(out.shape))

    def describe(self, scheme: WeightScheme) -> str:
        return "int8 (bitsandbytes, one scale per row)"

    def reference(self, tensor: torch.Tensor, **_: Any) -> torch.Tensor:
        bnbf = _bnb()
        mat = tensor.reshape(-1, tensor.shape[-1]).contiguous()
        data, scales, _ = bnbf.int8_vectorwise_quant(mat)
        return bnbf.int8_vectorwise_dequant(data, scales).reshape(tensor.shape).to(tensor.dtype)


NF4 = Nf4Format()
INT8 = Int8Format()
