"""One expert's parameter slice kept in the bytes the checkpoint stores it in, and how it decodes.

A :class:`StoredLayout` (built once per parameter of a layer by the key map) says which stored
tensors make the slice and how: for FP8 ``[gate; up]`` it is two pieces (each an FP8 weight and its
block scales) concatenated along rows; for MXFP4 one piece (blocks and e8m0 scales) transposed into
the model's ``[in, out]`` layout. A :class:`StoredTensor` is those tensors for one expert: it moves
between devices as stored bytes (so a host-to-device copy moves FP8 or FP4, not bf16) and
``dequantize()`` builds the model's tensor where it sits, right before it is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .decode import dequantize_fp8, dequantize_int, dequantize_mxfp4
from .spec import WeightScheme


@dataclass(frozen=True)
class Piece:
    """One stored weight and its companions, as positions in the expert's list of stored tensors.

    ``role`` is ``"fp8"``, ``"mxfp4"``, ``"int"`` or ``"plain"`` (stored unquantized: only a cast).
    ``rows`` / ``cols``: the decoded weight's shape in the stored orientation.
    """

    role: str
    weight: int
    scale: int | None = None
    zero_point: int | None = None
    rows: int = 0
    cols: int = 0


@dataclass(frozen=True)
class StoredLayout:
    """How one parameter slice is decoded from its stored tensors (shared by every expert of a layer)."""

    pieces: tuple[Piece, ...]
    scheme: WeightScheme
    shape: tuple[int, ...]  # the model's slice shape
    dtype: torch.dtype  # the model's dtype
    transpose: bool = False  # decoded [out, in] but the model holds [in, out] (MXFP4 experts)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The decoded shape before the transpose (rows of every piece stacked)."""
        return tuple(reversed(self.shape)) if self.transpose else self.shape

    def decode(self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The model's tensor from the stored ``tensors``, computed on their device. ``out`` (shape
        :attr:`stored_shape`) receives the result; a transposed layout is returned as a view of it."""
        dtype = dtype or self.dtype
        if out is None:
            out = torch.empty(self.stored_shape, dtype=dtype, device=tensors[0].device)
        if not out.dim():  # a 0-d tensor (a scalar expert parameter) has no rows to stack
            out.copy_(tensors[self.pieces[0].weight].reshape(()))
            return out
        at = 0
        for p in self.pieces:
            self._decode_piece(p, tensors, dtype, out.narrow(0, at, p.rows))
            at += p.rows
        return out.t() if self.transpose else out

    def _decode_piece(self, p: Piece, t: tuple[torch.Tensor, ...], dtype: torch.dtype, out: torch.Tensor) -> None:
        w = t[p.weight]
        if p.role == "plain":
            out.copy_(w.reshape(out.shape))
        elif p.role == "fp8":
            dequantize_fp8(w, t[p.scale], self.scheme.block, dtype, out=out)
        elif p.role == "mxfp4":
            dequantize_mxfp4(w, t[p.scale], dtype, out=out)
        else:
            zp = t[p.zero_point] if p.zero_point is not None else None
            dequantize_int(w, t[p.scale], zp, bits=self.scheme.bits, group_size=self.scheme.group_size,
                           shape=(p.rows, p.cols), dtype=dtype, out=out)

    @property
    def kind(self) -> str:
        return self.scheme.kind


@dataclass
class StoredTensor:
    """One expert's slice of a parameter as stored (e.g. FP8 weights plus scales); see the module doc."""

    layout: StoredLayout
    tensors: tuple[torch.Tensor, ...]
    _nbytes: int = field(default=0, repr=False)

    def __post_init__(self):
        self._nbytes = sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes held (the stored bytes, which is what a cache budget counts)."""
        return self._nbytes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> StoredTensor:
        return StoredTensor(self.layout, tuple(t.to(device, non_blocking=non_blocking) for t in self.tensors))

    def pin_memory(self) -> StoredTensor:
        return StoredTensor(self.layout, tuple(t.pin_memory() for t in self.tensors))

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.layout.decode(self.tensors, out=out)

    def parts(self) -> list[torch.Tensor]:
        return list(self.tensors)
