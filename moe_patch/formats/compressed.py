"""compressed-tensors checkpoints (Kimi-K2-Thinking, GLM and Qwen releases): ``pack-quantized`` signed
integers (int4/int8, per group or per channel, symmetric or with packed zero points) packed into int32 words,
and ``float-quantized`` FP8 (per channel, per tensor or block), whose pieces decode with :mod:`.fp8`.

The scheme is the config group that covers the routed experts, by transformers' own rule (the group whose
``re:`` targets name the experts, else the first class-name group). The integer decoder reproduces
compressed-tensors' ``unpack_from_int32`` + ``_dequantize`` (little-endian hosts).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointError, MoEConfigError
from ..kernels.spec import ExpertFormat
from .base import Format, Piece, StoredPart, WeightScheme, by_base, first_nonfinite, positive_int
from .cast import CAST
from .fp8 import FP8, scaled_piece
from .stored import finish


def unpack_int(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """compressed-tensors ``pack_to_int32`` in reverse along the last dimension: int8 values in
    ``[-2**(bits-1), 2**(bits-1))``, ``cols`` of them per row (little-endian hosts)."""
    u8 = packed.contiguous().view(torch.uint8)
    if bits == 4:
        q = torch.stack((u8 & 0xF, u8 >> 4), dim=-1).view(torch.int8).view(*u8.shape[:-1], -1)
    elif bits == 8:
        q = u8.view(torch.int8)
    else:  # pragma: no cover - read_config admits 4 and 8 only
        raise ValueError(f"{bits}-bit packing is not supported")
    return q[..., :cols] - (1 << (bits - 1))


def dequantize_int(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    bits: int,
    group_size: int | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` weight ``[rows, cols]``: ``(q - zero_point) * scale`` computed
    in the scale's dtype (as compressed-tensors' ``_dequantize`` does), per group or per channel."""
    rows, cols = shape
    x = unpack_int(packed, bits, cols).to(scale.dtype)
    if group_size is None:
        if zero_point is not None:
            x = x - unpack_int(zero_point.t(), bits, rows).t().to(scale.dtype).reshape(rows, -1)
        return finish(x * scale.reshape(rows, -1), dtype, out)
    g = x.unflatten(-1, (cols // group_size, group_size))
    if zero_point is not None:
        zp = unpack_int(zero_point.t(), bits, rows).t().to(scale.dtype)
        g = g - zp.unsqueeze(-1)
    return finish((g * scale.unsqueeze(-1)).flatten(-2), dtype, out)


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    method = "compressed-tensors"
    hf_dequantize_op = "CompressedTensorsDequantize"
    suffixes = ("weight", "weight_scale", "weight_zero_point", "weight_global_scale", "weight_packed", "weight_shape")

    def read_config(self, raw: dict[str, Any]) -> WeightScheme:
        groups = raw.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise MoEConfigError("quantization_config.config_groups is missing or empty (compressed-tensors needs it).")
        items = list(groups.items())
        chosen = next(
            (
                g
                for g in items
                if any(str(t).startswith("re:") and "experts" in str(t) for t in (g[1] or {}).get("targets", []))
            ),
            None,
        )
        chosen = chosen or next(
            (g for g in items if any(not str(t).startswith("re:") for t in (g[1] or {}).get("targets", []))), items[0]
        )
        name, group = chosen
        weights = (group or {}).get("weights")
        where = f"config_groups.{name}.weights"
        if not isinstance(weights, dict):
            raise MoEConfigError(f"quantization_config.{where} is missing.")
        kind, bits = weights.get("type"), weights.get("num_bits")
        strategy = weights.get("strategy")
        fmt = (group or {}).get("format") or raw.get("format")
        if kind == "int" and bits in (4, 8) and strategy in ("group", "channel"):
            if fmt not in ("pack-quantized", None):
                raise MoEConfigError(
                    f"quantization_config format {fmt!r} for int{bits} experts: only pack-quantized is supported."
                )
            group_size = positive_int(weights.get("group_size"), f"{where}.group_size") if strategy == "group" else None
            return WeightScheme("int", bits=bits, group_size=group_size, symmetric=bool(weights.get("symmetric", True)))
        if kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
            return WeightScheme("fp8", block=None)
        if kind == "float" and bits == 8 and strategy == "block":
            block = weights.get("block_structure")
            if not isinstance(block, (list, tuple)) or len(block) != 2:
                raise MoEConfigError(
                    f"quantization_config.{where}.block_structure must be two integers, got {block!r}."
                )
            return WeightScheme("fp8", block=(positive_int(block[0], where), positive_int(block[1], where)))
        raise MoEConfigError(
            f"quantization_config.{where}: {kind} {bits}-bit with strategy {strategy!r} is not supported; supported: "
            "int4/int8 pack-quantized (group or channel) and FP8 float-quantized (channel, tensor or block)."
        )

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        if scheme.kind == "fp8":
            return FP8.bytes_per_param(scheme)
        per_group = 2.0 / scheme.group_size if scheme.group_size else 0.0  # bf16/fp16 scale per group
        zero_points = (scheme.bits / 8) / scheme.group_size if scheme.group_size and not scheme.symmetric else 0.0
        return scheme.bits / 8 + per_group + zero_points

    def describe(self, scheme: WeightScheme) -> str:
        if scheme.kind == "fp8":
            return FP8.describe(scheme, method=self.method)
        group = f"groups of {scheme.group_size}" if scheme.group_size else "per channel"
        return f"{self.method}: int{scheme.bits} {'symmetric' if scheme.symmetric else 'asymmetric'}, {group}"

    def claims(self, key: str, dtype: torch.dtype) -> bool:
        return key.endswith((".weight_packed", ".weight_zero_point", ".weight_global_scale", ".weight_shape"))

    def pieces(
        self, scheme: WeightScheme, target: str, shape: tuple[int, ...], parts: dict[str, StoredPart]
    ) -> list[Piece]:
        bases = by_base(parts, self.suffixes)
        pieces = []
        for base, roles in bases.items():
            where = next(iter(roles.values())).entry
            if "weight_global_scale" in roles:
                raise CheckpointError(f"{where.file}: {base}weight_global_scale (NVFP4-style) is not supported.")
            if "weight_packed" in roles:
                pieces.append(self._int_piece(scheme, shape, roles, base))
            else:
                pieces.append(scaled_piece(FP8, CAST, scheme, roles, base, "weight_scale"))
        return pieces

    def _int_piece(
        self, scheme: WeightScheme, shape: tuple[int, ...], roles: dict[str, StoredPart], base: str
    ) -> Piece:
        packed = roles["weight_packed"]
        where = packed.entry
        if "weight_scale" not in roles:
            raise CheckpointError(f"{where.file}: packed tensor {where.key!r} has no {base}weight_scale tensor.")
        if not scheme.symmetric and "weight_zero_point" not in roles:
            raise CheckpointError(
                f"{where.file}: asymmetric tensor {where.key!r} has no {base}weight_zero_point tensor."
            )
        rows = packed.shape[0]
        # the model says how many input columns there are (the packed width is rounded up to 32 bits)
        _, cols = shape if len(shape) == 2 else (rows, 0)
        if (
            where.dtype != torch.int32
            or len(packed.shape) != 2
            or packed.shape[1] != math.ceil(cols * scheme.bits / 32)
        ):
            raise CheckpointError(
                f"{where.file}: packed tensor {where.key!r} ({list(packed.shape)}, {where.dtype}) cannot hold "
                f"{rows}x{cols} int{scheme.bits} values."
            )
        scale = roles["weight_scale"]
        groups = cols // scheme.group_size if scheme.group_size else 1
        if tuple(scale.shape) != (rows, groups):
            raise CheckpointError(
                f"{scale.entry.file}: scale tensor {scale.entry.key!r} has shape {list(scale.shape)}; {where.key!r} "
                f"needs [{rows}, {groups}] (group_size {scheme.group_size})."
            )
        zero = roles.get("weight_zero_point")
        return Piece(
            self, packed.position, scale.position, zero.position if zero is not None else None, rows=rows, cols=cols
        )

    def nonfinite(self, piece: Piece, tensors: tuple[torch.Tensor, ...]) -> int | None:
        return first_nonfinite(tensors, piece.scale)

    def kernel_format(self, piece: Piece, scheme: WeightScheme, tensors: tuple[torch.Tensor, ...]):
        """pack-quantized int4/int8 (groups or channel, zero points packed along rows) as the kernels read it.
        This format's FP8 pieces are :mod:`.fp8`'s (their ``Piece.format``), so they never come here."""
        scale = tensors[piece.scale]
        return ExpertFormat(
            f"int{scheme.bits}",
            group_size=scheme.group_size,
            scale_dtype=scale.dtype,
            zero_point=piece.zero_point is not None,
        )

    def kernel_tensors(self, piece: Piece, tensors: tuple[torch.Tensor, ...]):
        zp = tensors[piece.zero_point] if piece.zero_point is not None else None
        return tensors[piece.weight], tensors[piece.scale], zp

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        zp = tensors[piece.zero_point] if piece.zero_point is not None else None
        dequantize_int(
            tensors[piece.weight],
            tensors[piece.scale],
            zp,
            bits=scheme.bits,
            group_size=scheme.group_size,
            shape=(piece.rows, piece.cols),
            dtype=dtype,
            out=out,
        )

    def reference(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        shape: tuple[int, int],
        scheme: dict[str, Any],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """compressed-tensors' own ``PackedQuantizationCompressor.decompress`` on one weight."""
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationScheme

        state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor(list(shape))}
        if zero_point is not None:
            state["weight_zero_point"] = zero_point
        out = PackedQuantizationCompressor.decompress(state, QuantizationScheme(targets=["Linear"], weights=scheme))
        return out["weight"].to(dtype)


COMPRESSED_TENSORS = CompressedTensorsFormat()
