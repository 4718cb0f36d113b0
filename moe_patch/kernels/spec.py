"""What a kernel layer computes: the stored format of each projection, the layer's shape and activation,
and the checks that an expert's tensors are what the format says (pure; no library needed).

Storage follows the checkpoints (and the decoders of ``moe_patch/formats``), weights in nn.Linear
orientation ``[rows = outputs, cols = inputs]``:

========  ==========================================  ===========================================
kind      weight tensor                               scale (and zero point)
========  ==========================================  ===========================================
bf16      bfloat16 ``[rows, cols]``                   -
fp16      float16 ``[rows, cols]``                    -
fp32      float32 ``[rows, cols]``                    -
fp8       float8_e4m3fn ``[rows, cols]``              per ``block`` ``[ceil(rows/b0), ceil(cols/b1)]``,
                                                      per channel ``[rows]``/``[rows, 1]``, or per tensor
                                                      (one value); float32/bf16/fp16, or uint8 /
                                                      float8_e8m0fnu exponent bytes (ue8m0)
mxfp4     uint8 ``[rows, cols/32, 16]`` (two e2m1     uint8 e8m0 ``[rows, cols/32]``
          codes per byte, low nibble first)
int4      int32 ``[rows, ceil(cols/8)]``              ``[rows, cols/group]`` or ``[rows, 1]`` (channel);
          (compressed-tensors pack-quantized:         zero points int32 ``[ceil(rows/8), groups]``
          8 nibbles per word, value = nibble - 8)     packed along rows
int8      int32 ``[rows, ceil(cols/4)]``              as int4, zero points ``[ceil(rows/4), groups]``
          (value = byte - 128)
========  ==========================================  ===========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError
from .library import ACTIVATIONS, DT_BF16, DT_E8M0, DT_F16, DT_F32, DT_NONE, GLU_LAYOUTS, W_FORMATS, MpProj

KINDS = tuple(W_FORMATS)
SCALE_DTYPES = {torch.float32: DT_F32, torch.bfloat16: DT_BF16, torch.float16: DT_F16, torch.uint8: DT_E8M0}
if hasattr(torch, "float8_e8m0fnu"):
    SCALE_DTYPES[torch.float8_e8m0fnu] = DT_E8M0
FLOAT_DTYPES = {torch.float32: DT_F32, torch.bfloat16: DT_BF16, torch.float16: DT_F16}
WEIGHT_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "mxfp4": torch.uint8,
    "int4": torch.int32,
    "int8": torch.int32,
}


@dataclass(frozen=True)
class ExpertFormat:
    """How one projection (gate_up or down) of every expert of a layer is stored.

    Attributes:
        kind: one of ``bf16``, ``fp16``, ``fp32``, ``fp8``, ``mxfp4``, ``int4``, ``int8``.
        block: FP8 scale block ``(rows, cols)``; ``None`` with ``per_tensor=False`` is one scale per output row.
        per_tensor: FP8 with a single scale.
        group_size: int4/int8 inputs per scale; ``None`` is one scale per output row (channel strategy).
        scale_dtype: dtype of the scales (FP8: float32, bfloat16, float16, or uint8 for ue8m0 exponent bytes;
            INT: float32, bfloat16, float16). MXFP4's are always e8m0 bytes.
        zero_point: int4/int8 with packed zero points (asymmetric).
        bias: dtype of a per-expert bias of this projection (gpt-oss), ``None`` without.
        transposed: stored ``[cols, rows]`` (gpt-oss bf16, Llama 4). Not computed by the kernels: the layer
            is refused so the caller keeps torch's path.
        split: the rows are stored as two tensors, the first and the second half (a gate_up projection whose
            gate and up are stored apart: DeepSeek/Qwen3/MiniMax FP8, Kimi int4). Weight, scale and zero point
            are then each a ``(first, second)`` pair in :class:`ExpertWeights`, each half shaped as a projection
            of ``rows // 2`` rows (its own scale grid: a ragged last block per half, as the checkpoints store
            it); the bias stays one tensor. Read through a second pointer per row, so it costs nothing.
    """

    kind: str
    block: tuple[int, int] | None = None
    per_tensor: bool = False
    group_size: int | None = None
    scale_dtype: torch.dtype | None = None
    zero_point: bool = False
    bias: torch.dtype | None = None
    transposed: bool = False
    split: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidArgumentError(f"ExpertFormat.kind {self.kind!r} is not one of {', '.join(KINDS)}.")
        if self.block is not None and (len(self.block) != 2 or any(int(b) < 1 for b in self.block)):
            raise InvalidArgumentError(f"ExpertFormat.block must be two positive integers, got {self.block!r}.")
        if self.group_size is not None and self.group_size < 1:
            raise InvalidArgumentError(f"ExpertFormat.group_size must be positive, got {self.group_size}.")
        if self.bias is not None and self.bias not in FLOAT_DTYPES:
            raise InvalidArgumentError(f"ExpertFormat.bias must be float32, bfloat16 or float16, got {self.bias}.")

    @classmethod
    def dense(cls, dtype: torch.dtype, *, transposed: bool = False) -> ExpertFormat | None:
        """Plain float weights of ``dtype`` (None for a dtype the kernels do not read, e.g. float64)."""
        kind = next((k for k, d in WEIGHT_DTYPES.items() if d == dtype and k in ("bf16", "fp16", "fp32")), None)
        return cls(kind, transposed=transposed) if kind is not None else None

    @property
    def scaled(self) -> bool:
        return self.kind in ("fp8", "mxfp4", "int4", "int8")

    def effective_scale_dtype(self) -> torch.dtype | None:
        if self.kind == "mxfp4":
            return torch.uint8
        if self.kind in ("fp8", "int4", "int8"):
            return self.scale_dtype or torch.float32
        return None

    def unsupported(self, rows: int, cols: int) -> str | None:
        """Why the kernels cannot compute this projection of shape ``[rows, cols]``, or None."""
        if self.transposed:
            return f"{self.kind} experts stored transposed ([in, out]) are computed in torch, not by the kernels"
        if self.split:
            if rows % 2:
                return f"a projection stored in two halves needs an even number of rows, got {rows}"
            rows //= 2
        sdt = self.effective_scale_dtype()
        if sdt is not None and sdt not in SCALE_DTYPES:
            return f"{self.kind} scales of dtype {sdt} are not supported"
        if self.kind == "mxfp4" and cols % 32:
            return f"MXFP4 needs the input dimension to be a multiple of 32, got {cols}"
        if self.kind == "fp8" and self.block is not None and not self.per_tensor:
            b1 = self.block[1]
            if b1 < cols and (b1 % 32 or b1 & (b1 - 1)):
                return f"FP8 scale blocks {self.block}: the kernels need a power-of-two multiple of 32 columns"
        if self.kind in ("int4", "int8"):
            if self.scale_dtype == torch.uint8:
                return "integer formats take float scales"
            g = self.group_size
            if g is not None and g < cols and (g % 32 or g & (g - 1)):
                return f"group size {g}: the kernels need a power-of-two multiple of 32"
            if g is not None and cols % g:
                return f"{cols} inputs are not a whole number of groups of {g}"
        return None

    def proj(self, rows: int, cols: int) -> MpProj:
        """The C description of this projection (call :meth:`unsupported` first)."""
        p = MpProj()
        p.fmt, p.rows, p.cols = W_FORMATS[self.kind], rows, cols
        p.split = rows // 2 if self.split else 0
        if self.split:  # scales, blocks and zero points are those of one half
            rows //= 2
        sdt = self.effective_scale_dtype()
        p.sdtype = SCALE_DTYPES[sdt] if sdt is not None else DT_F32
        p.b0, p.b1_shift, p.scols = 1, 31, 1
        if self.kind == "fp8":
            if self.per_tensor:
                p.b0 = rows
            elif self.block is not None:
                b0, b1 = self.block
                p.b0 = b0
                p.scols = math.ceil(cols / b1)
                p.b1_shift = int(math.log2(b1)) if b1 < cols else 31
        elif self.kind == "mxfp4":
            p.b1_shift, p.scols = 5, cols // 32
        elif self.kind in ("int4", "int8") and self.group_size is not None and self.group_size < cols:
            p.b1_shift, p.scols = int(math.log2(self.group_size)), cols // self.group_size
        p.bits = {"int4": 4, "int8": 8}.get(self.kind, 0)
        p.has_zp = int(self.zero_point and self.kind in ("int4", "int8"))
        p.bias_dtype = FLOAT_DTYPES[self.bias] if self.bias is not None else DT_NONE
        p.wrow_bytes = row_bytes(self.kind, cols)
        return p

    # ------------------------------------------------------------------ expected tensor shapes
    def weight_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.kind == "mxfp4":
            return (rows, cols // 32, 16)
        if self.kind in ("int4", "int8"):
            return (rows, math.ceil(cols / (8 if self.kind == "int4" else 4)))
        return (rows, cols)

    def scale_shapes(self, rows: int, cols: int) -> tuple[tuple[int, ...], ...]:
        """The scale shapes accepted (same numel, any of these views)."""
        if self.kind == "mxfp4":
            return ((rows, cols // 32),)
        if self.kind == "fp8":
            if self.per_tensor:
                return ((), (1,), (1, 1))
            if self.block is None:
                return ((rows,), (rows, 1))
            return ((math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])),)
        if self.kind in ("int4", "int8"):
            if self.group_size is None or self.group_size >= cols:
                return ((rows, 1), (rows,))
            return ((rows, cols // self.group_size),)
        return ()

    def zero_point_shape(self, rows: int, cols: int) -> tuple[int, int]:
        per_word = 32 // (4 if self.kind == "int4" else 8)
        groups = 1 if self.group_size is None or self.group_size >= cols else cols // self.group_size
        return (math.ceil(rows / per_word), groups)


def row_bytes(kind: str, cols: int) -> int:
    """Bytes of one stored row."""
    if kind in ("bf16", "fp16"):
        return 2 * cols
    if kind == "fp32":
        return 4 * cols
    if kind == "fp8":
        return cols
    if kind == "mxfp4":
        return cols // 2
    if kind == "int4":
        return 4 * math.ceil(cols / 8)
    return 4 * math.ceil(cols / 4)  # int8


@dataclass(frozen=True)
class MoELayerSpec:
    """One MoE layer as the kernels see it.

    Attributes:
        num_experts, hidden, intermediate: E, H and I (gate_up is ``[2I, H]``, down ``[H, I]``).
        gate_up, down: the stored format of each projection.
        activation: ``silu`` (silu(gate) * up: Mixtral, Qwen, DeepSeek, GLM ...), ``gpt_oss`` (gpt-oss's clamped
            SwiGLU with ``alpha`` and ``limit``) or ``gelu_tanh`` (gelu, tanh approximation, times up).
        glu_layout: ``halves`` (rows ``[gate; up]``) or ``interleaved`` (row 2j is gate j, 2j+1 up j: gpt-oss).
    """

    num_experts: int
    hidden: int
    intermediate: int
    gate_up: ExpertFormat
    down: ExpertFormat
    activation: str = "silu"
    glu_layout: str = "halves"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        for name in ("num_experts", "hidden", "intermediate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"MoELayerSpec.{name} must be a positive integer, got {value!r}.")
        if self.activation not in ACTIVATIONS:
            raise InvalidArgumentError(
                f"MoELayerSpec.activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}."
            )
        if self.glu_layout not in GLU_LAYOUTS:
            raise InvalidArgumentError(
                f"MoELayerSpec.glu_layout {self.glu_layout!r} is not one of {', '.join(GLU_LAYOUTS)}."
            )

    @property
    def gate_up_shape(self) -> tuple[int, int]:
        return (2 * self.intermediate, self.hidden)

    @property
    def down_shape(self) -> tuple[int, int]:
        return (self.hidden, self.intermediate)

    def unsupported(self) -> str | None:
        """Why the kernels cannot compute this layer, or None."""
        if self.down.split:
            return "the down projection is one tensor (only gate_up may be stored in two halves)"
        if self.gate_up.split and self.glu_layout != "halves":
            return "a gate_up projection stored in two halves is [gate; up]: the glu layout must be 'halves'"
        return self.gate_up.unsupported(*self.gate_up_shape) or self.down.unsupported(*self.down_shape)


Halves = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ExpertWeights:
    """One expert's stored tensors (CPU, contiguous), as :class:`ExpertFormat` describes them. For a gate_up
    projection stored in two halves (``ExpertFormat.split``) its weight, scale and zero point are pairs."""

    gate_up: torch.Tensor | Halves
    down: torch.Tensor
    gate_up_scale: torch.Tensor | Halves | None = None
    down_scale: torch.Tensor | None = None
    gate_up_zero_point: torch.Tensor | Halves | None = None
    down_zero_point: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


def _check_tensor(t: torch.Tensor | None, where: str, dtypes, shapes) -> torch.Tensor:
    if t is None:
        raise InvalidArgumentError(f"{where} is missing.")
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"{where} must be a tensor, got {type(t).__name__}.")
    if t.device.type != "cpu":
        raise InvalidArgumentError(f"{where} is on {t.device}; the kernels read CPU memory.")
    if t.dtype not in dtypes:
        raise InvalidArgumentError(f"{where} has dtype {t.dtype}, expected {' or '.join(map(str, dtypes))}.")
    if tuple(t.shape) not in shapes:
        raise InvalidArgumentError(f"{where} has shape {tuple(t.shape)}, expected {' or '.join(map(str, shapes))}.")
    if not t.is_contiguous():
        raise InvalidArgumentError(f"{where} is not contiguous.")
    return t


def _halves(t, where: str) -> tuple:
    if not isinstance(t, (tuple, list)) or len(t) != 2:
        raise InvalidArgumentError(
            f"{where}: the projection is stored in two halves (ExpertFormat.split); give a "
            f"(first, second) pair, got {type(t).__name__}."
        )
    return tuple(t)


def _part_pointers(
    fmt: ExpertFormat, rows: int, cols: int, where: str, weight, scale, zero_point, keep: list[torch.Tensor]
) -> list[int]:
    """The three addresses (weight, scale, zero point) of one stored part after checking its tensors."""
    if isinstance(weight, (tuple, list)):
        raise InvalidArgumentError(
            f"{where}: a pair of tensors for a projection stored as one (ExpertFormat.split is False)."
        )
    keep.append(_check_tensor(weight, f"{where} weight", (WEIGHT_DTYPES[fmt.kind],), {fmt.weight_shape(rows, cols)}))
    ptrs = [weight.data_ptr(), 0, 0]
    sdt = fmt.effective_scale_dtype()
    if sdt is not None:
        dtypes = (sdt,) if sdt != torch.uint8 else tuple(d for d, c in SCALE_DTYPES.items() if c == DT_E8M0)
        keep.append(_check_tensor(scale, f"{where} scale", dtypes, set(fmt.scale_shapes(rows, cols))))
        ptrs[1] = scale.data_ptr()
    elif scale is not None:
        raise InvalidArgumentError(f"{where}: a {fmt.kind} weight has no scale, got one.")
    if fmt.zero_point and fmt.kind in ("int4", "int8"):
        keep.append(
            _check_tensor(zero_point, f"{where} zero point", (torch.int32,), {fmt.zero_point_shape(rows, cols)})
        )
        ptrs[2] = zero_point.data_ptr()
    elif zero_point is not None:
        raise InvalidArgumentError(f"{where}: the format has no zero points, got one.")
    return ptrs


def projection_pointers(
    fmt: ExpertFormat, rows: int, cols: int, where: str, weight, scale, zero_point, bias: torch.Tensor | None
) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """The four addresses (weight, scale, zero point, bias) of one projection after checking every tensor
    against ``fmt``, the three of its second half (zeros unless ``fmt.split``), and the tensors to keep
    alive while they are used."""
    keep: list[torch.Tensor] = []
    second = [0, 0, 0]
    if fmt.split:
        half = rows // 2
        w = _halves(weight, f"{where} weight")
        s = _halves(scale, f"{where} scale") if scale is not None else (None, None)
        z = _halves(zero_point, f"{where} zero point") if zero_point is not None else (None, None)
        ptrs = _part_pointers(fmt, half, cols, f"{where} (first half)", w[0], s[0], z[0], keep)
        second = _part_pointers(fmt, half, cols, f"{where} (second half)", w[1], s[1], z[1], keep)
    else:
        ptrs = _part_pointers(fmt, rows, cols, where, weight, scale, zero_point, keep)
    ptrs.append(0)
    if fmt.bias is not None:
        keep.append(_check_tensor(bias, f"{where} bias", (fmt.bias,), {(rows,)}))
        ptrs[3] = bias.data_ptr()
    elif bias is not None:
        raise InvalidArgumentError(f"{where}: the format has no bias, got one (set ExpertFormat.bias).")
    return ptrs, second, keep
