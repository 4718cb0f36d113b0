"""What a checkpoint's ``quantization_config`` says about how its weights are stored (pure, no I/O).

The one place that reads and checks that field. Supported methods are the ones the hundred-billion
class MoE releases use: fine-grained ``fp8`` (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, MiniMax-M2),
``mxfp4`` (gpt-oss) and ``compressed-tensors`` (``pack-quantized`` integer groups such as
Kimi-K2-Thinking, ``float-quantized`` FP8 such as GLM-4.7-FP8). Anything else is refused before a
byte of the checkpoint is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import MoEConfigError

SUPPORTED_METHODS = ("fp8", "mxfp4", "compressed-tensors")


@dataclass(frozen=True)
class WeightScheme:
    """How one group of weights is quantized.

    Attributes:
        kind: ``"fp8"`` (float8_e4m3fn values times a scale), ``"mxfp4"`` (e2m1 pairs, e8m0 exponent
            per 32 inputs), ``"int"`` (packed signed integers times a scale, minus a zero point) or
            ``"cast"`` (another float dtype than the model's, e.g. a bf16 checkpoint computed in fp32).
        block: FP8 scale block ``(rows, cols)``; ``None`` means the scale's own shape broadcasts
            (per tensor, per output channel).
        bits / group_size / symmetric: integer schemes (``group_size`` None: one scale per channel).
        scale_fmt: ``"float"`` or ``"ue8m0"`` (power-of-two scales, possibly stored as exponent bytes).
    """

    kind: str
    block: tuple[int, int] | None = None
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    scale_fmt: str = "float"


@dataclass(frozen=True)
class QuantizationSpec:
    """A checkpoint's quantization, as far as moe-patch needs it.

    ``experts`` is the scheme of the routed experts; ``raw`` the ``quantization_config`` dict as the
    checkpoint wrote it (transformers' own quantizer is built from it for the key mapping).
    """

    method: str
    experts: WeightScheme
    raw: dict[str, Any]

    def expert_bytes_per_param(self) -> float:
        """Stored bytes per routed-expert parameter, scales included (ragged blocks and biases aside):
        what a memory plan counts before any file is read."""
        s = self.experts
        if s.kind == "fp8":
            return 1.0 + (4.0 / (s.block[0] * s.block[1]) if s.block else 0.0)  # float32 block scales
        if s.kind == "mxfp4":
            return 0.5 + 1.0 / 32  # e2m1 pairs, one e8m0 byte per 32
        per_group = 2.0 / s.group_size if s.group_size else 0.0  # bf16/fp16 scale per group
        zero_points = (s.bits / 8) / s.group_size if s.group_size and not s.symmetric else 0.0
        return s.bits / 8 + per_group + zero_points

    def describe(self) -> str:
        s = self.experts
        if s.kind == "fp8":
            grid = f"{s.block[0]}x{s.block[1]} blocks" if s.block else "per-tensor/channel scales"
            return f"{self.method}: FP8 e4m3 with {grid}" + (" (ue8m0)" if s.scale_fmt == "ue8m0" else "")
        if s.kind == "mxfp4":
            return "mxfp4: FP4 e2m1, e8m0 scale per 32"
        group = f"groups of {s.group_size}" if s.group_size else "per channel"
        return f"{self.method}: int{s.bits} {'symmetric' if s.symmetric else 'asymmetric'}, {group}"


def _as_dict(qc: Any) -> dict[str, Any]:
    if isinstance(qc, dict):
        return dict(qc)
    if hasattr(qc, "to_dict"):
        return qc.to_dict()
    raise MoEConfigError(f"quantization_config must be a JSON object, got {type(qc).__name__}.")


def _positive_int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoEConfigError(f"quantization_config.{where} must be a positive integer, got {value!r}.")
    return value


def read_quantization_config(qc: Any) -> QuantizationSpec | None:
    """The :class:`QuantizationSpec` of a config's ``quantization_config`` (``None`` when absent).

    Raises :class:`MoEConfigError` naming the field for an unsupported method or a malformed field.
    """
    if qc is None or qc == {}:
        return None
    raw = _as_dict(qc)
    method = raw.get("quant_method")
    if method not in SUPPORTED_METHODS:
        shown = "(missing)" if method is None else repr(method)
        raise MoEConfigError(
            f"quantization_config.quant_method {shown} is not supported by the offload engine; supported: "
            f"{', '.join(SUPPORTED_METHODS)}. Dequantize the checkpoint to bf16 first, or load it with "
            "transformers directly."
        )
    if method == "fp8":
        return QuantizationSpec(method, _fp8_scheme(raw), raw)
    if method == "mxfp4":
        return QuantizationSpec(method, WeightScheme("mxfp4", bits=4, group_size=32), raw)
    return QuantizationSpec(method, _compressed_experts_scheme(raw), raw)


def _fp8_scheme(raw: dict[str, Any]) -> WeightScheme:
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
        block = (_positive_int(block[0], "weight_block_size[0]"), _positive_int(block[1], "weight_block_size[1]"))
    return WeightScheme("fp8", block=block, scale_fmt=scale_fmt)


def _compressed_experts_scheme(raw: dict[str, Any]) -> WeightScheme:
    """The scheme of the config group that covers the routed experts (transformers' own rule:
    the group whose ``re:`` targets name the experts, else the first class-name group)."""
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise MoEConfigError("quantization_config.config_groups is missing or empty (compressed-tensors needs it).")
    items = list(groups.items())
    chosen = next((g for g in items if any(str(t).startswith("re:") and "experts" in str(t)
                                            for t in (g[1] or {}).get("targets", []))), None)
    chosen = chosen or next((g for g in items if any(not str(t).startswith("re:")
                                                     for t in (g[1] or {}).get("targets", []))), items[0])
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
            raise MoEConfigError(f"quantization_config format {fmt!r} for int{bits} experts: only pack-quantized is supported.")
        group_size = _positive_int(weights.get("group_size"), f"{where}.group_size") if strategy == "group" else None
        return WeightScheme("int", bits=bits, group_size=group_size, symmetric=bool(weights.get("symmetric", True)))
    if kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
        return WeightScheme("fp8", block=None)
    if kind == "float" and bits == 8 and strategy == "block":
        block = weights.get("block_structure")
        if not isinstance(block, (list, tuple)) or len(block) != 2:
            raise MoEConfigError(f"quantization_config.{where}.block_structure must be two integers, got {block!r}.")
        return WeightScheme("fp8", block=(_positive_int(block[0], where), _positive_int(block[1], where)))
    raise MoEConfigError(
        f"quantization_config.{where}: {kind} {bits}-bit with strategy {strategy!r} is not supported; supported: "
        "int4/int8 pack-quantized (group or channel) and FP8 float-quantized (channel, tensor or block)."
    )
