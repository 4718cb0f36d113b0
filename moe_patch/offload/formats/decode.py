"""Vectorised dequantization of one expert's stored tensors (pure functions, any device).

Each function reproduces the arithmetic of transformers' own dequantize path for that format
bit for bit (``tests/test_formats.py`` checks it against :mod:`.reference`), without its
per-call Python overhead and, for FP8, with the block size the config gives instead of one
guessed from the shapes (transformers' ``Fp8Dequantize`` is wrong when a dimension is not a
multiple of the block). Results can be written into a preallocated ``out`` (a cache slot).
"""

from __future__ import annotations

import functools

import torch

#: e2m1 values by 4-bit code, as transformers' ``FP4_VALUES``
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _finish(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return x if x.dtype == dtype else x.to(dtype)
    return out.copy_(x)


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: e8m0 exponent bytes (``uint8``, or ``float8_e8m0fnu``) become ``2 ** (b - 127)``."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                   dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight [rows, cols]`` (float8_e4m3fn) times its scale, computed in float32 and rounded once to
    ``dtype``: one scale per ``block`` (ragged last blocks included), or a per-tensor / per-row scale."""
    rows, cols = weight.shape
    s = scale_values(scale)
    x = weight.to(torch.float32)
    if block is None or s.numel() == 1:
        if s.numel() == 1:
            x.mul_(s.reshape(()))
        else:
            x.mul_(s.reshape(rows, 1))
        return _finish(x, dtype, out)
    b0, b1 = block
    full, rem = divmod(cols, b1)
    # expand the scales over rows only; columns broadcast through a view (no weight-sized scale tensor)
    s = s.repeat_interleave(b0, dim=0)[:rows]
    x[:, : full * b1].unflatten(-1, (full, b1)).mul_(s[:, :full, None])
    if rem:
        x[:, full * b1:].mul_(s[:, full:])
    return _finish(x, dtype, out)


@functools.lru_cache(maxsize=16)
def _pair_table(dtype: torch.dtype, device: str) -> torch.Tensor:
    """``[256, 2]``: the two e2m1 values of each byte, low nibble first."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.arange(256)
    return torch.stack([lut[codes & 0xF], lut[codes >> 4]], dim=-1).to(device=device, dtype=dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 ``blocks [rows, G, 16]`` (uint8, two e2m1 per byte) with e8m0 ``scales [rows, G]`` ->
    ``[rows, G * 32]`` in the stored orientation (transformers' ``convert_moe_packed_tensors`` returns
    its transpose). FP4 values times powers of two are exact in float32 and bfloat16, so those compute
    in ``dtype`` directly; other dtypes go through float32 as transformers' ``ldexp`` does."""
    rows, groups, width = blocks.shape
    compute = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    table = _pair_table(compute, str(blocks.device))
    vals = table[blocks.to(torch.int32)].view(rows, groups, 2 * width)
    # torch.ldexp(x, e) is x * pow(2.0, e): the same factor, so the same rounding
    factor = torch.pow(2.0, scales.to(torch.int32) - 127).to(compute)
    vals.mul_(factor.unsqueeze(-1))
    return _finish(vals.view(rows, groups * 2 * width), dtype, out)


def unpack_int(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """compressed-tensors ``pack_to_int32`` in reverse along the last dimension: int8 values in
    ``[-2**(bits-1), 2**(bits-1))``, ``cols`` of them per row (little-endian hosts)."""
    u8 = packed.contiguous().view(torch.uint8)
    if bits == 4:
        q = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).view(torch.int8).view(*u8.shape[:-1], -1)
    elif bits == 8:
        q = u8.view(torch.int8)
    else:  # pragma: no cover - spec.py admits 4 and 8 only
        raise ValueError(f"{bits}-bit packing is not supported")
    return q[..., :cols] - (1 << (bits - 1))


def dequantize_int(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, *, bits: int,
                   group_size: int | None, shape: tuple[int, int], dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` weight ``[rows, cols]``: ``(q - zero_point) * scale`` computed
    in the scale's dtype (as compressed-tensors' ``_dequantize`` does), per group or per channel."""
    rows, cols = shape
    x = unpack_int(packed, bits, cols).to(scale.dtype)
    if group_size is None:
        if zero_point is not None:
            x = x - unpack_int(zero_point.t(), bits, rows).t().to(scale.dtype).reshape(rows, -1)
        return _finish(x * scale.reshape(rows, -1), dtype, out)
    g = x.unflatten(-1, (cols // group_size, group_size))
    if zero_point is not None:
        zp = unpack_int(zero_point.t(), bits, rows).t().to(scale.dtype)
        g = g - zp.unsqueeze(-1)
    return _finish((g * scale.unsqueeze(-1)).flatten(-2), dtype, out)
