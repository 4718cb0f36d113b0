"""Plain floats stored in another dtype than the model computes in (e.g. a bf16 checkpoint computed in fp32 on a
CPU whose fp32 GEMV beats its bf16 one): kept in the caches as stored (half the bytes), cast where computed.

Also the piece quantized formats use for the unquantized parts of a checkpoint (a weight without a scale).
"""

from __future__ import annotations

from typing import Any

import torch

from ..kernels.spec import ExpertFormat
from .base import Format, Piece, StoredPart, WeightScheme

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class CastFormat(Format):
    name = "cast"
    scheme = WeightScheme("cast")

    def applies(self, parts: list[StoredPart], shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether ``parts`` are floats of another dtype than ``dtype`` that stack along rows into ``shape``."""
        if not parts or all(p.entry.dtype == dtype for p in parts):
            return False
        if any(not p.entry.dtype.is_floating_point or p.entry.dtype in _FP8_DTYPES for p in parts):
            return False
        shapes = [p.shape if p.shape else (1,) for p in parts]
        return all(tuple(s[1:]) == tuple(shape[1:]) for s in shapes) and sum(s[0] for s in shapes) == (
            shape[0] if shape else 1
        )

    def pieces(
        self, scheme: WeightScheme, target: str, shape: tuple[int, ...], parts: dict[str, StoredPart]
    ) -> list[Piece]:
        out = []
        for part in parts.values():
            s = part.shape if part.shape else (1,)
            out.append(self.piece(part.position, s))
        return out

    def piece(self, position: int, shape: tuple[int, ...]) -> Piece:
        """The piece of one unquantized stored tensor of ``shape``."""
        return Piece(self, position, rows=shape[0], cols=shape[1] if len(shape) > 1 else 1)

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        out.copy_(tensors[piece.weight].reshape(out.shape))

    def kernel_format(self, piece: Piece, scheme: WeightScheme, tensors: tuple[torch.Tensor, ...]):
        w = tensors[piece.weight]
        return ExpertFormat.dense(w.dtype) if w.dim() == 2 else None

    def kernel_tensors(self, piece: Piece, tensors: tuple[torch.Tensor, ...]):
        return tensors[piece.weight], None, None

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        return 2.0  # the checkpoints this serves store bf16/fp16

    def describe(self, scheme: WeightScheme) -> str:
        return "plain floats (cast where computed)"

    def reference(self, tensor: torch.Tensor, dtype: torch.dtype, **_: Any) -> torch.Tensor:
        return tensor.to(dtype)


CAST = CastFormat()
