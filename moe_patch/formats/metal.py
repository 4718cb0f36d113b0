"""Metal / MLX affine integers (``quant_method: metal``): each weight's values are unsigned ``bits``-bit codes
(2, 4 or 8) packed little-endian into ``uint32`` words along the input dimension, with a ``scales`` and a
``qbiases`` tensor per group of ``group_size`` inputs: ``value = code * scale + bias``. transformers reads it
through its Metal quantizer, which dequantizes on any machine without Apple's GPU.

The decoder reproduces transformers' ``_affine_dequantize_tensor`` + ``.to(scales.dtype)`` bit for bit
(float32 products, one rounding to the scales' dtype, then the model's dtype as loading casts).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, MoEConfigError
from .base import Format, Piece, StoredPart, WeightScheme, by_base, first_nonfinite, positive_int
from .cast import CAST

_PACKED = (torch.uint32, torch.int32)


def unpack_affine(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The ``bits``-bit codes of ``packed [rows, words]`` (uint32, little-endian), ``cols`` per row, as uint8."""
    u8 = packed.contiguous().view(torch.uint8)
    per_byte, mask = 8 // bits, (1 << bits) - 1
    if per_byte == 1:
        return u8[:, :cols]
    codes = torch.stack([(u8 >> (bits * k)) & mask for k in range(per_byte)], dim=-1)
    return codes.reshape(u8.shape[0], -1)[:, :cols]


def dequantize_affine(
    packed: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[rows, groups * group_size]`` values ``code * scale + bias`` in float32, rounded to the scales' dtype."""
    rows, groups = scales.shape
    codes = unpack_affine(packed, bits, groups * group_size).to(torch.float32).view(rows, groups, group_size)
    x = (codes * scales.float().unsqueeze(-1) + biases.float().unsqueeze(-1)).view(rows, -1).to(scales.dtype)
    return out.copy_(x) if out is not None else x.to(dtype)


class MetalFormat(Format):
    name = "metal"
    method = "metal"
    hf_dequantize_op = "MetalDequantize"
    suffixes = ("weight", "scales", "qbiases")

    def read_config(self, raw: dict[str, Any]) -> WeightScheme:
        bits = raw.get("bits", 4)
        if bits not in (2, 4, 8):
            raise MoEConfigError(f"quantization_config.bits must be 2, 4 or 8 for metal checkpoints, got {bits!r}.")
        return WeightScheme(
            "metal", bits=bits, group_size=positive_int(raw.get("group_size", 64), "group_size"), symmetric=False
        )

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        return scheme.bits / 8 + 4.0 / scheme.group_size  # a 16-bit scale and a 16-bit bias per group

    def describe(self, scheme: WeightScheme) -> str:
        return f"metal: uint{scheme.bits} affine (scale and bias per {scheme.group_size}, MLX layout)"

    def claims(self, key: str, dtype: torch.dtype) -> bool:
        return key.endswith((".scales", ".qbiases")) or (dtype == torch.uint32 and key.endswith(".weight"))

    def pieces(
        self, scheme: WeightScheme, target: str, shape: tuple[int, ...], parts: dict[str, StoredPart]
    ) -> list[Piece]:
        pieces = []
        for base, roles in by_base(parts, self.suffixes).items():
            w = roles.get("weight")
            if w is None:
                where = next(iter(roles.values())).entry
                raise CheckpointError(f"{where.file}: no weight tensor for {base!r} (found {sorted(roles)}).")
            if "scales" not in roles:  # a weight left unquantized
                pieces.append(CAST.piece(w.position, w.shape))
                continue
            s, b = roles["scales"], roles.get("qbiases")
            if b is None:
                raise CheckpointError(f"{s.entry.file}: {w.entry.key!r} has scales but no {base}qbiases tensor.")
            rows, words = w.shape if len(w.shape) == 2 else (0, 0)
            cols = words * 32 // scheme.bits
            groups = cols // scheme.group_size
            if (
                w.entry.dtype not in _PACKED
                or len(w.shape) != 2
                or cols % scheme.group_size
                or tuple(s.shape) != (rows, groups)
                or tuple(b.shape) != (rows, groups)
            ):
                raise CheckpointError(
                    f"{w.entry.file}: {w.entry.key!r} {list(w.shape)} {w.entry.dtype} with scales {list(s.shape)} and "
                    f"qbiases {list(b.shape)} is not {scheme.bits}-bit codes packed in uint32 with one scale and bias "
                    f"per {scheme.group_size} inputs."
                )
            pieces.append(Piece(self, w.position, s.position, b.position, rows=rows, cols=cols))
        return pieces

    def nonfinite(self, piece: Piece, tensors: tuple[torch.Tensor, ...]) -> int | None:
        return first_nonfinite(tensors, piece.scale, piece.zero_point)

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        dequantize_affine(
            tensors[piece.weight],
            tensors[piece.scale],
            tensors[piece.zero_point],
            bits=scheme.bits,
            group_size=scheme.group_size,
            dtype=dtype,
            out=out,
        )

    def reference(
        self, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, *, bits: int, group_size: int
    ) -> torch.Tensor:
        """transformers' ``_affine_dequantize_tensor`` as its ``MetalDequantize`` op applies it."""
        from transformers.integrations.metal_quantization import _affine_dequantize_tensor

        return _affine_dequantize_tensor(packed, scales, biases, group_size, bits).to(scales.dtype)


METAL = MetalFormat()
