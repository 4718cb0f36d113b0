"""One expert's parameter slice kept in the bytes it is stored in, and how it decodes (any format).

A :class:`StoredLayout` (built once per parameter of a layer by the key map, or by a cache format) says which
stored tensors make the slice and how: for FP8 ``[gate; up]`` two pieces (each an FP8 weight and its block
scales) stacked along rows; for MXFP4 one piece (blocks and e8m0 scales) transposed into the model's
``[in, out]`` layout; for a cache-quantized nf4 weight one piece (packed codes and block absmax). A
:class:`StoredTensor` is those tensors for one expert: it moves between devices as stored bytes (a
host-to-device copy moves FP8 or FP4, not bf16) and ``dequantize()`` builds the model's tensor where it sits,
right before it is computed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import torch

from ..kernels.spec import ExpertFormat
from .base import Piece, WeightScheme


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

    @property
    def kind(self) -> str:
        return self.scheme.kind

    def nonfinite(self, tensors: tuple[torch.Tensor, ...]) -> int | None:
        """The position of a stored tensor whose non-finite values would silently corrupt the decode (a scale
        or bias holding NaN/inf), or None."""
        return next((bad for p in self.pieces if (bad := p.format.nonfinite(p, tensors)) is not None), None)

    def kernel_format(self, tensors: tuple[torch.Tensor, ...], transposed: bool = False) -> ExpertFormat | None:
        """How the CPU kernels read this parameter straight from its stored bytes (``tensors``: one expert's
        stored tensors, or meta tensors of their shapes and dtypes); ``transposed``: the model computes with it as
        ``[in, out]``. Two pieces of equal rows (gate and up stored apart) are one projection in two halves. The
        result says ``transposed`` when the bytes are ``[in, out]`` (the kernels refuse it). None when a piece's
        format has no kernel entry, or the pieces differ."""
        if len(self.shape) != 2 or len(self.pieces) not in (1, 2):
            return None
        formats = {p.format.kernel_format(p, self.scheme, tensors) for p in self.pieces}
        if len(formats) != 1 or None in formats:
            return None
        fmt = formats.pop()
        if len(self.pieces) == 2:
            if self.pieces[0].rows != self.pieces[1].rows:
                return None
            fmt = replace(fmt, split=True)
        return replace(fmt, transposed=True) if transposed != self.transpose else fmt

    def kernel_tensors(self, tensors: tuple[torch.Tensor, ...]) -> tuple:
        """(weight, scale, zero point) as the kernels read them, each a ``(first, second)`` pair for two pieces
        (views of ``tensors``; for a layout :meth:`kernel_format` described)."""
        parts = [p.format.kernel_tensors(p, tensors) for p in self.pieces]
        if len(parts) == 1:
            return parts[0]
        return tuple(None if a is None else (a, b) for a, b in zip(*parts))

    def decode(
        self, tensors: tuple[torch.Tensor, ...], dtype: torch.dtype | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
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
            p.format.decode(p, tensors, self.scheme, dtype, out.narrow(0, at, p.rows))
            at += p.rows
        return out.t() if self.transpose else out


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


def materialize(t: torch.Tensor | StoredTensor) -> torch.Tensor:
    """The tensor to compute with, decoded where ``t`` lives."""
    return t.dequantize() if isinstance(t, StoredTensor) else t


def nbytes_of(t: torch.Tensor | StoredTensor) -> int:
    """Bytes a cache entry's tensor holds (stored bytes, not the decoded size)."""
    return t.nbytes if isinstance(t, StoredTensor) else t.numel() * t.element_size()


def tensors_of(t: torch.Tensor | StoredTensor) -> list[torch.Tensor]:
    """The tensors behind a (possibly stored) weight, for stream bookkeeping."""
    return t.parts() if isinstance(t, StoredTensor) else [t]


# -- scratch buffers shared by the decoders ------------------------------------------------------------
_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable buffer for a decoder's temporaries on the CPU: a fresh multi-megabyte tensor
    is a fresh mapping whose first touch page-faults (it took two thirds of an MXFP4 decode). On a GPU the
    caching allocator already reuses memory."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def finish(
    x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, *, from_scratch: bool = False
) -> torch.Tensor:
    """``x`` as the result: into ``out``, or a tensor of its own when ``x`` is a scratch buffer."""
    if out is not None:
        return out.copy_(x)
    if x.dtype == dtype:
        return x.clone() if from_scratch else x
    return x.to(dtype)
