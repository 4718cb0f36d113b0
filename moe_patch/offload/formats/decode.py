"""Vectorised dequantization of one expert's stored tensors (pure functions, any device).

Each function reproduces the arithmetic of transformers' own dequantize path for that format
bit for bit (``tests/test_formats.py`` checks it against :mod:`.reference`), without its
per-call Python overhead and, for FP8, with the block size the config gives instead of one
guessed from the shapes (transformers' ``Fp8Dequantize`` is wrong when a dimension is not a
multiple of the block). Results can be written into a preallocated ``out`` (a cache slot).
"""

from __future__ import annotations

import functools
import threading

import torch

#: e2m1 values by 4-bit code, as transformers' ``FP4_VALUES``
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


_local = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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


def _finish(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, *, scratch: bool = False) -> torch.Tensor:
    """``x`` as the result: into ``out``, or a tensor of its own when ``x`` is a scratch buffer."""
    if out is not None:
        return out.copy_(x)
    if x.dtype == dtype:
        return x.clone() if scratch else x
    return x.to(dtype)


def fp8_to_float32(weight: torch.Tensor) -> torch.Tensor:
    """FP8 values as float32, in a scratch buffer, exactly. torch's own cast runs elementwise in scalar
    code on CPUs (4 ms for 1.5M values on an AVX2 core pair); here the bits are moved into a float16 (an
    e4m3 value is a float16 / 256 once its 4 exponent and 3 mantissa bits sit in float16's fields,
    subnormals included; e5m2 is float16's high byte) and float16 -> float32 is one vectorised cast
    (1.2 ms). e4m3's NaN codes (0x7F, 0xFF) come out as 480; checkpoints carry none."""
    n = weight.numel()
    b = weight.contiguous().view(torch.uint8).reshape(-1)
    a = _scratch("fp8_bits", n, torch.int16, weight.device)
    a.copy_(b)
    if weight.dtype == torch.float8_e5m2:
        a.bitwise_left_shift_(8)
        factor = 1.0
    else:
        sign = _scratch("fp8_sign", n, torch.int16, weight.device)
        torch.bitwise_and(a, 0x80, out=sign).bitwise_left_shift_(8)
        a.bitwise_and_(0x7F).bitwise_left_shift_(7).bitwise_or_(sign)
        factor = 256.0  # the float16 reading is the value / 2**8 (exponent bias 15 against 7)
    x = _scratch("fp8_f32", n, torch.float32, weight.device).view(weight.shape)
    x.copy_(a.view(torch.float16).view(weight.shape))
    if factor != 1.0:
        x.mul_(factor)  # a power of two: exact
    return x


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
    x = fp8_to_float32(weight)
    if block is None or s.numel() == 1:
        if s.numel() == 1:
            x.mul_(s.reshape(()))
        else:
            x.mul_(s.reshape(rows, 1))
        return _finish(x, dtype, out, scratch=True)
    b0, b1 = block
    full, rem = divmod(cols, b1)
    # expand the scales over rows only; columns broadcast through a view (no weight-sized scale tensor)
    s = s.repeat_interleave(b0, dim=0)[:rows]
    x[:, : full * b1].unflatten(-1, (full, b1)).mul_(s[:, :full, None])
    if rem:
        x[:, full * b1:].mul_(s[:, full:])
    return _finish(x, dtype, out, scratch=True)


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


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 ``blocks [rows, G, 16]`` (uint8, two e2m1 per byte) with e8m0 ``scales [rows, G]`` ->
    ``[rows, G * 32]`` in the stored orientation (transformers' ``convert_moe_packed_tensors`` returns
    its transpose). FP4 values times powers of two are exact in float32 and bfloat16, so those compute
    in ``dtype`` directly; other dtypes go through float32 as transformers' ``ldexp`` does."""
    rows, groups, width = blocks.shape
    compute = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
    words = _pair_words(compute, str(blocks.device))
    n = blocks.numel()
    index = _scratch("mxfp4_index", n, torch.int32, blocks.device)
    index.copy_(blocks.reshape(-1))
    direct = out is not None and out.dtype == compute and out.is_contiguous()
    own = out is None and compute == dtype  # the result is a new tensor anyway: decode straight into it
    if direct:
        vals = out.view(words.dtype).reshape(-1)
    elif own:
        vals = torch.empty(n, dtype=words.dtype, device=blocks.device)
    else:  # a temporary in the compute dtype, then cast or copied into ``out``
        vals = _scratch("mxfp4_vals", n, words.dtype, blocks.device)
    torch.index_select(words, 0, index, out=vals)
    vals = vals.view(compute).view(rows, groups, 2 * width)
    # torch.ldexp(x, e) is x * pow(2.0, e): the same factor, so the same rounding
    factor = torch.pow(2.0, scales.to(torch.int32) - 127).to(compute)
    vals.mul_(factor.unsqueeze(-1))
    if direct:
        return out
    if own:
        return vals.view(rows, groups * 2 * width)
    return _finish(vals.view(rows, groups * 2 * width), dtype, out, scratch=True)


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
