"""MXFP4 (gpt-oss-20b/120b): ``*_blocks`` uint8 ``[rows, groups, 16]`` holding two e2m1 codes per byte (low
nibble first) and ``*_scales`` uint8 ``[rows, groups]`` e8m0 exponents, one per 32 inputs; ``quant_method:
mxfp4``. Experts are stored ``[out, in]`` and the model holds ``[in, out]`` (``transposed``).

The decoder reproduces transformers' ``convert_moe_packed_tensors`` bit for bit: FP4 values times powers of
two are exact in float32 and bfloat16, so those compute in the target dtype directly.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import CheckpointError
from ..kernels.spec import ExpertFormat
from .base import Format, Piece, StoredPart, WeightScheme, first_nonfinite
from .stored import finish, scratch

#: e2m1 values by 4-bit code, as transformers' ``FP4_VALUES``
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@functools.lru_cache(maxsize=16)
def _pair_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """``[256, 2]``: the two e2m1 values of each byte, low nibble first."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.arange(256)
    return torch.stack([lut[codes & 0xF], lut[codes >> 4]], dim=-1).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=16)
def _pair_words(dtype: torch.dtype, device: str) -> torch.Tensor:
    """The pair table as one word per byte (two 2-byte values, or two 4-byte ones as int64), so one
    ``index_select`` of a flat table decodes a byte (a gather of 2-wide rows is several times slower)."""
    word = {2: torch.int32, 4: torch.int64}[torch.empty((), dtype=dtype).element_size()]
    return _pair_table(dtype, device).contiguous().view(word).reshape(256)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """MXFP4 ``blocks [rows, G, 16]`` (uint8, two e2m1 per byte) with e8m0 ``scales [rows, G]`` ->
    ``[rows, G * 32]`` in the stored orientation (transformers' ``convert_moe_packed_tensors`` returns
    its transpose). FP4 values times powers of two are exact in float32 and bfloat16, so those compute
    in ``dtype`` directly; other dtypes go through float32 as transformers' ``ldexp`` does."""
    rows, groups, width = blocks.shape
    compute = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    words = _pair_words(compute, str(blocks.device))
    n = blocks.numel()
    index = scratch("mxfp4_index", n, torch.int32, blocks.device)
    index.copy_(blocks.reshape(-1))
    direct = out is not None and out.dtype == compute and out.is_contiguous()
    own = out is None and compute == dtype  # the result is a new tensor anyway: decode straight into it
    if direct:
        vals = out.view(words.dtype).reshape(-1)
    elif own:
        vals = torch.empty(n, dtype=words.dtype, device=blocks.device)
    else:  # a temporary in the compute dtype, then cast or copied into ``out``
        vals = scratch("mxfp4_vals", n, words.dtype, blocks.device)
    torch.index_select(words, 0, index, out=vals)
    vals = vals.view(compute).view(rows, groups, 2 * width)
    # torch.ldexp(x, e) is x * pow(2.0, e): the same factor, so the same rounding
    factor = torch.pow(2.0, scales.to(torch.int32) - 127).to(compute)
    vals.mul_(factor.unsqueeze(-1))
    if direct:
        return out
    if own:
        return vals.view(rows, groups * 2 * width)
    return finish(vals.view(rows, groups * 2 * width), dtype, out, from_scratch=True)


class Mxfp4Format(Format):
    name = "mxfp4"
    method = "mxfp4"
    hf_dequantize_op = "Mxfp4Dequantize"
    transposed = True

    def read_config(self, raw: dict[str, Any]) -> WeightScheme:
        return WeightScheme("mxfp4", bits=4, group_size=32)

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        return 0.5 + 1.0 / 32  # e2m1 pairs, one e8m0 byte per 32

    def describe(self, scheme: WeightScheme) -> str:
        return "mxfp4: FP4 e2m1, e8m0 scale per 32"

    def claims(self, key: str, dtype: torch.dtype) -> bool:
        return dtype == torch.uint8 and key.endswith(("_blocks", "_scales"))

    def pieces(
        self, scheme: WeightScheme, target: str, shape: tuple[int, ...], parts: dict[str, StoredPart]
    ) -> list[Piece]:
        blocks = next((p for pattern, p in parts.items() if pattern.endswith("_blocks")), None)
        scales = next((p for pattern, p in parts.items() if pattern.endswith("_scales")), None)
        if blocks is None or scales is None:
            where = next(iter(parts.values())).entry.file if parts else "?"
            raise CheckpointError(
                f"{where}: {target!r} needs both *_blocks and *_scales tensors (MXFP4); found {sorted(parts)}."
            )
        b, s = blocks, scales
        if (
            b.entry.dtype != torch.uint8
            or s.entry.dtype != torch.uint8
            or len(b.shape) != 3
            or b.shape[-1] != 16
            or tuple(s.shape) != tuple(b.shape[:-1])
        ):
            raise CheckpointError(
                f"{b.entry.file}: MXFP4 tensors {b.entry.key!r} {list(b.shape)} {b.entry.dtype} / {s.entry.key!r} "
                f"{list(s.shape)} {s.entry.dtype} do not form uint8 blocks [rows, groups, 16] with scales "
                "[rows, groups]."
            )
        return [Piece(self, b.position, s.position, rows=b.shape[0], cols=b.shape[1] * 32)]

    def nonfinite(self, piece: Piece, tensors: tuple[torch.Tensor, ...]) -> int | None:
        return first_nonfinite(tensors, piece.scale)  # e8m0 0xFF is NaN

    def kernel_format(self, piece: Piece, scheme: WeightScheme, tensors: tuple[torch.Tensor, ...]):
        return ExpertFormat("mxfp4")  # blocks [rows, cols/32, 16] and e8m0 scales, as the kernels read them

    def kernel_tensors(self, piece: Piece, tensors: tuple[torch.Tensor, ...]):
        return tensors[piece.weight], tensors[piece.scale], None

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        dequantize_mxfp4(tensors[piece.weight], tensors[piece.scale], dtype, out=out)

    def reference(self, blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """transformers' ``convert_moe_packed_tensors`` on one expert (the expert dimension kept: a 2-D slice
        fails); ``[in, out]``, the transpose of :func:`dequantize_mxfp4`."""
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(blocks.unsqueeze(0), scales.unsqueeze(0), dtype=dtype)[0]


MXFP4 = Mxfp4Format()
