"""FP8 e4m3 weights with float32 (or ue8m0) scales: block-wise ``weight_block_size`` (DeepSeek-V3/R1, Kimi-K2,
Qwen3-FP8, MiniMax-M2), per output channel or per tensor; ``quant_method: fp8``, and the FP8 groups of
compressed-tensors (``float-quantized``) decode here too.

The decoder reproduces transformers' ``_dequantize_fp8_weight`` bit for bit (float32 products, one rounding to
the model dtype) with the block size the config gives: transformers' loader op ``Fp8Dequantize`` guesses the
block from the shapes and is wrong when a dimension is not a multiple of it (DeepSeek-V3's 576-row
``kv_a_proj_with_mqa``), so FP8 dense tensors are decoded here as well (``decodes_dense``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError, MoEConfigError
from ..kernels.spec import ExpertFormat
from .base import Format, Piece, StoredPart, WeightScheme, by_base, first_nonfinite, positive_int
from .cast import CAST, CastFormat
from .stored import finish, scratch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# -- pure decoders ----------------------------------------------------------------------------------------
def fp8_to_float32(weight: torch.Tensor) -> torch.Tensor:
    """FP8 values as float32, in a scratch buffer, exactly. torch's own cast runs elementwise in scalar
    code on CPUs (4 ms for 1.5M values on an AVX2 core pair); here the bits are moved into a float16 (an
    e4m3 value is a float16 / 256 once its 4 exponent and 3 mantissa bits sit in float16's fields,
    subnormals included; e5m2 is float16's high byte) and float16 -> float32 is one vectorised cast
    (1.2 ms). e4m3's NaN codes (0x7F, 0xFF) come out as 480; checkpoints carry none."""
    n = weight.numel()
    b = weight.contiguous().view(torch.uint8).reshape(-1)
    a = scratch("fp8_bits", n, torch.int16, weight.device)
    a.copy_(b)
    if weight.dtype == torch.float8_e5m2:
        a.bitwise_left_shift_(8)
        factor = 1.0
    else:
        sign = scratch("fp8_sign", n, torch.int16, weight.device)
        torch.bitwise_and(a, 0x80, out=sign).bitwise_left_shift_(8)
        a.bitwise_and_(0x7F).bitwise_left_shift_(7).bitwise_or_(sign)
        factor = 256.0  # the float16 reading is the value / 2**8 (exponent bias 15 against 7)
    x = scratch("fp8_f32", n, torch.float32, weight.device).view(weight.shape)
    x.copy_(a.view(torch.float16).view(weight.shape))
    if factor != 1.0:
        x.mul_(factor)  # a power of two: exact
    return x


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float32: e8m0 exponent bytes (``uint8``, or ``float8_e8m0fnu``) become ``2 ** (b - 127)``."""
    if scale.dtype == torch.uint8:
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequantize_fp8(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int] | None,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
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
        return finish(x, dtype, out, from_scratch=True)
    b0, b1 = block
    full, rem = divmod(cols, b1)
    # expand the scales over rows only; columns broadcast through a view (no weight-sized scale tensor)
    s = s.repeat_interleave(b0, dim=0)[:rows]
    x[:, : full * b1].unflatten(-1, (full, b1)).mul_(s[:, :full, None])
    if rem:
        x[:, full * b1 :].mul_(s[:, full:])
    return finish(x, dtype, out, from_scratch=True)


# -- pieces ---------------------------------------------------------------------------------------------
def check_fp8_scale(w: StoredPart, s: StoredPart, block: tuple[int, int] | None) -> None:
    """The scale tensor ``s`` fits weight ``w`` under ``block`` (CheckpointError naming both otherwise)."""
    rows, cols = w.shape
    numel = math.prod(s.shape)
    if block is None:
        ok = numel == 1 or tuple(s.shape) in ((rows, 1), (rows,))
        want = "one value, [rows] or [rows, 1]"
    else:
        grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        ok = tuple(s.shape) == grid
        want = f"{list(grid)} for weight_block_size {list(block)}"
    if not ok:
        raise CheckpointError(
            f"{s.entry.file}: scale tensor {s.entry.key!r} has shape {list(s.shape)} but weight {w.entry.key!r} "
            f"{[rows, cols]} needs {want}. The checkpoint or its quantization_config.weight_block_size is wrong."
        )
    if not (s.entry.dtype.is_floating_point or s.entry.dtype == torch.uint8):
        raise CheckpointError(
            f"{s.entry.file}: scale tensor {s.entry.key!r} has dtype {s.entry.dtype}; expected "
            "float32/bf16/fp16 or e8m0 exponent bytes."
        )


def scaled_piece(
    fp8: Format, cast: CastFormat, scheme: WeightScheme, roles: dict[str, StoredPart], base: str, scale_key: str
) -> Piece:
    """The piece of one FP8 weight (``roles["weight"]``) and its scale ``roles[scale_key]``; an unquantized
    weight without a scale is a cast piece."""
    where = next(iter(roles.values())).entry
    if "weight" not in roles:
        raise CheckpointError(f"{where.file}: no weight tensor for {base!r} (found {sorted(roles)}).")
    w = roles["weight"]
    if len(w.shape) != 2:
        raise CheckpointError(f"{w.entry.file}: tensor {w.entry.key!r} has shape {list(w.shape)}; expected 2-D.")
    if w.entry.dtype not in FP8_DTYPES:
        if scale_key in roles:
            raise CheckpointError(
                f"{w.entry.file}: tensor {w.entry.key!r} is {w.entry.dtype} but has a scale; expected FP8."
            )
        return cast.piece(w.position, w.shape)
    if scale_key not in roles:
        raise CheckpointError(
            f"{w.entry.file}: FP8 tensor {w.entry.key!r} has no {w.entry.key.rpartition('.')[0]}.{scale_key} "
            "scale tensor. The checkpoint is incomplete; re-download it."
        )
    check_fp8_scale(w, roles[scale_key], scheme.block)
    return Piece(fp8, w.position, roles[scale_key].position, rows=w.shape[0], cols=w.shape[1])


def fp8_kernel_format(piece: Piece, scheme: WeightScheme, tensors: tuple[torch.Tensor, ...]):
    """The kernels' description of an FP8 e4m3 piece: block scales per ``scheme.block``, else one scale per
    output channel or per tensor (read from the scale's size); None for e5m2 (the kernels decode e4m3 only)."""
    w, s = tensors[piece.weight], tensors[piece.scale]
    if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
        return None
    if s.numel() == 1:
        return ExpertFormat("fp8", per_tensor=True, scale_dtype=s.dtype)
    return ExpertFormat("fp8", block=scheme.block, scale_dtype=s.dtype)


class Fp8Format(Format):
    name = "fp8"
    method = "fp8"
    hf_dequantize_op = "Fp8Dequantize"
    suffixes = ("weight", "weight_scale_inv", "activation_scale")
    decodes_dense = True

    def read_config(self, raw: dict[str, Any]) -> WeightScheme:
        if raw.get("fmt", "e4m3") not in ("e4m3", None):
            raise MoEConfigError(f"quantization_config.fmt {raw['fmt']!r}: only e4m3 FP8 checkpoints are supported.")
        if raw.get("expert_dtype", "fp8") != "fp8":
            raise MoEConfigError(
                f"quantization_config.expert_dtype {raw['expert_dtype']!r}: FP4-packed FP8 experts are not supported."
            )
        scale_fmt = raw.get("scale_fmt") or "float"
        if scale_fmt not in ("float", "ue8m0"):
            raise MoEConfigError(f"quantization_config.scale_fmt must be 'float' or 'ue8m0', got {scale_fmt!r}.")
        # transformers' FineGrainedFP8Config defaults to 128x128 blocks when the field is absent
        block = raw.get("weight_block_size", (128, 128))
        if block is not None:
            if not isinstance(block, (list, tuple)) or len(block) != 2:
                raise MoEConfigError(f"quantization_config.weight_block_size must be two integers, got {block!r}.")
            block = (positive_int(block[0], "weight_block_size[0]"), positive_int(block[1], "weight_block_size[1]"))
        return WeightScheme("fp8", block=block, scale_fmt=scale_fmt)

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        return 1.0 + (4.0 / (scheme.block[0] * scheme.block[1]) if scheme.block else 0.0)  # float32 block scales

    def describe(self, scheme: WeightScheme, method: str | None = None) -> str:
        grid = f"{scheme.block[0]}x{scheme.block[1]} blocks" if scheme.block else "per-tensor/channel scales"
        return f"{method or self.method}: FP8 e4m3 with {grid}" + (" (ue8m0)" if scheme.scale_fmt == "ue8m0" else "")

    def claims(self, key: str, dtype: torch.dtype) -> bool:
        return dtype in FP8_DTYPES or key.endswith(".weight_scale_inv")

    def stores_quantized(self, entries) -> bool:
        return any(e.dtype in FP8_DTYPES for e in entries)

    def pieces(
        self, scheme: WeightScheme, target: str, shape: tuple[int, ...], parts: dict[str, StoredPart]
    ) -> list[Piece]:
        return [
            scaled_piece(self, CAST, scheme, roles, base, "weight_scale_inv")
            for base, roles in by_base(parts, self.suffixes).items()
        ]

    def nonfinite(self, piece: Piece, tensors: tuple[torch.Tensor, ...]) -> int | None:
        return first_nonfinite(tensors, piece.scale)

    def kernel_format(self, piece: Piece, scheme: WeightScheme, tensors: tuple[torch.Tensor, ...]):
        return fp8_kernel_format(piece, scheme, tensors)

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
        dequantize_fp8(tensors[piece.weight], tensors[piece.scale], scheme.block, dtype, out=out)

    def reference(
        self, weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """transformers' ragged-safe FP8 dequantization (``_dequantize_fp8_weight``) in float32, rounded to
        ``dtype``."""
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        s = scale
        if s.dtype == torch.uint8:
            s = (s.to(torch.float32) - 127.0).exp2()
        return _dequantize_fp8_weight(weight.clone(), s.to(torch.float32), block, torch.float32).to(dtype)

    def reference_loader(self, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What ``from_pretrained(..., FineGrainedFP8Config(dequantize=True))`` does to one weight
        (``Fp8Dequantize._dequantize_one``: the block is guessed from the shapes)."""
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=dtype)


FP8 = Fp8Format()
