"""What a weight format is: the :class:`Format` protocol, the pieces of a stored tensor, the parsed config.

A *format* says how weights are stored and how they decode: the checkpoint formats of the big MoE releases
(FP8, MXFP4, compressed-tensors), a plain float stored in another dtype than the model computes in (cast), and
the bitsandbytes nf4/int8 formats the caches can keep experts in. Each lives in one file of this package and
is registered in ``moe_patch.formats``; nothing outside that file switches on its name.

A stored parameter slice is a list of :class:`Piece` (for FP8 ``[gate; up]``: two FP8 weights with their
block scales, stacked along rows), each decoded by the format that stored it (compressed-tensors' FP8 groups
decode with :mod:`.fp8`'s decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import MoEConfigError

if TYPE_CHECKING:
    from ..io.safetensors import TensorEntry
    from ..kernels.spec import ExpertFormat

#: what a format hands the CPU kernels for one stored piece: weight, scale, zero point (views, no copy)
KernelTensors = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


@dataclass(frozen=True)
class WeightScheme:
    """How one group of weights is quantized (the fields a format reads; the rest keep their defaults).

    Attributes:
        kind: the name of the format that decodes these weights (``"fp8"``, ``"mxfp4"``, ``"int"``, ``"cast"``).
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
class StoredPart:
    """One checkpoint tensor an expert's parameter is made of, as the key map found it: its position in
    the expert's flat list of stored tensors, and where it lives (``entry``: file, key, dtype) with the
    shape of the expert's part of it."""

    position: int
    entry: TensorEntry
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """One stored weight and its companions, as positions in the expert's list of stored tensors.

    ``format`` decodes it; ``rows`` / ``cols`` are the decoded weight's shape in the stored orientation.
    """

    format: Format
    weight: int
    scale: int | None = None
    zero_point: int | None = None
    rows: int = 0
    cols: int = 0


class Format:
    """One weight format. Subclasses set the class attributes and override what they support.

    Checkpoint formats (``method`` set) are chosen by ``quantization_config.quant_method``; their pieces are
    found by the key map from transformers' own quantizer conversions (run with ``dequantize=True``, whose
    dequantize operation ``hf_dequantize_op`` moe-patch replaces with :meth:`decode`). Cache formats
    (``method`` None, ``encodes`` True) quantize a full-precision expert when it enters a cache.
    """

    #: registry key and the name statistics and errors use
    name: ClassVar[str]
    #: ``quantization_config.quant_method`` this format reads (None: not a checkpoint format)
    method: ClassVar[str | None] = None
    #: class name of transformers' dequantize operation for this method's conversions
    hf_dequantize_op: ClassVar[str | None] = None
    #: suffixes of a stored weight and its companions (``weight``, ``weight_scale_inv``...), longest matched first
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: transformers' dequantize op is replaced for dense (non-expert) tensors too (FP8: it guesses the block)
    decodes_dense: ClassVar[bool] = False
    #: the model holds the transpose of the stored orientation ([in, out]: gpt-oss MXFP4 experts)
    transposed: ClassVar[bool] = False
    #: quantizes full-precision tensors itself (cache formats)
    encodes: ClassVar[bool] = False

    # -- quantization_config --------------------------------------------------------------------
    def read_config(self, raw: dict[str, Any]) -> WeightScheme:
        """The routed experts' scheme from a validated ``quantization_config`` dict (MoEConfigError naming
        the field when a field is malformed or unsupported)."""
        raise NotImplementedError

    def bytes_per_param(self, scheme: WeightScheme) -> float:
        """Stored bytes per parameter, scales included: what a memory plan counts before a file is read."""
        raise NotImplementedError

    def describe(self, scheme: WeightScheme) -> str:
        """One line for ``inspect`` and the statistics, e.g. ``fp8: FP8 e4m3 with 128x128 blocks``."""
        raise NotImplementedError

    # -- one expert's stored tensors ------------------------------------------------------------------
    def claims(self, key: str, dtype: torch.dtype) -> bool:
        """Whether a checkpoint tensor of this name and dtype exists only in checkpoints of this format (an
        FP8 value, a block-scale companion): found in a checkpoint whose config has no ``quantization_config``,
        it means the config lost it, and reading the tensors as plain floats would be silently wrong."""
        return False

    def stores_quantized(self, entries: list[TensorEntry]) -> bool:
        """Whether these checkpoint tensors of a dense (non-expert) parameter are quantized (an FP8
        checkpoint keeps norms and embeddings unquantized)."""
        return True

    def pieces(
        self, scheme: WeightScheme, target: str, shape: tuple[int, ...], parts: dict[str, StoredPart]
    ) -> list[Piece]:
        """The pieces that build ``target`` (its slice for one expert, model shape ``shape``) from the
        stored tensors ``parts`` (keyed by transformers' source pattern), checked against each other:
        a missing companion or a wrong shape is a :class:`~moe_patch.errors.CheckpointError` naming the
        file and tensor."""
        raise NotImplementedError

    def decode(
        self,
        piece: Piece,
        tensors: tuple[torch.Tensor, ...],
        scheme: WeightScheme,
        dtype: torch.dtype,
        out: torch.Tensor,
    ) -> None:
        """Decode ``piece`` of ``tensors`` into ``out`` (``[piece.rows, piece.cols]``, on the tensors' device)."""
        raise NotImplementedError

    def nonfinite(self, piece: Piece, tensors: tuple[torch.Tensor, ...]) -> int | None:
        """The position of a companion of ``piece`` (scales, biases) holding a non-finite value, or None.
        Scales are a small fraction of an expert's bytes, so this runs on every read from disk; the weights
        themselves are not scanned (a NaN there shows as a non-finite expert output, which the engine names)."""
        return None

    # -- the CPU kernels (moe_patch.kernels) -------------------------------------------------------------
    def kernel_format(
        self, piece: Piece, scheme: WeightScheme, tensors: tuple[torch.Tensor, ...]
    ) -> ExpertFormat | None:
        """How the CPU kernels read ``piece`` straight from its stored bytes (``tensors``: one expert's stored
        tensors, or meta tensors of the same shapes and dtypes), in the stored orientation ``[rows, cols]``;
        None when they cannot (the expert is then decoded and computed in torch)."""
        return None

    def kernel_tensors(self, piece: Piece, tensors: tuple[torch.Tensor, ...]) -> KernelTensors:
        """``piece``'s (weight, scale, zero point) as the kernels read them (views of ``tensors``, no copy), for a
        piece :meth:`kernel_format` described."""
        raise NotImplementedError

    # -- cache formats ---------------------------------------------------------------------------------
    def encode(self, tensor: torch.Tensor) -> Any:
        """``tensor`` in this format (a :class:`~moe_patch.formats.stored.StoredTensor`), or ``tensor``
        itself when the format leaves it alone (vectors)."""
        raise NotImplementedError

    # -- the oracle --------------------------------------------------------------------------------------
    def reference(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The same values decoded by transformers' (or the format library's) own code: the tests' oracle."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@dataclass(frozen=True)
class QuantizationSpec:
    """A checkpoint's quantization, as far as moe-patch needs it.

    ``experts`` is the scheme of the routed experts; ``raw`` the ``quantization_config`` dict as the
    checkpoint wrote it (transformers' own quantizer is built from it for the key mapping); ``format`` the
    registered format of ``method``.
    """

    method: str
    experts: WeightScheme
    raw: dict[str, Any]
    format: Format

    def expert_bytes_per_param(self) -> float:
        """Stored bytes per routed-expert parameter, scales included (ragged blocks and biases aside)."""
        return self.format.bytes_per_param(self.experts)

    def describe(self) -> str:
        return self.format.describe(self.experts)


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds NaN or inf: float scales, or e8m0 exponent bytes (``uint8`` / ``float8_e8m0fnu``),
    whose only non-finite code, 0xFF, is NaN."""
    if t.numel() == 0:
        return False
    if t.dtype == torch.uint8 or t.dtype == getattr(torch, "float8_e8m0fnu", None):
        return int(t.view(torch.uint8).max()) == 0xFF  # one vectorised reduction (an == mask is 50x slower)
    if t.is_floating_point():
        # a finite sum proves every value finite (NaN and inf propagate); only an overflowing sum of huge finite
        # values needs the element-wise check. The sum reads the scales once, at memory speed.
        return not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all())
    return False


def first_nonfinite(tensors: tuple[torch.Tensor, ...], *positions: int | None) -> int | None:
    """The first of ``positions`` (None ones skipped) whose tensor holds a non-finite value."""
    return next((p for p in positions if p is not None and has_nonfinite(tensors[p])), None)


def positive_int(value: Any, where: str) -> int:
    """A positive integer field of ``quantization_config`` (MoEConfigError naming ``where`` otherwise)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoEConfigError(f"quantization_config.{where} must be a positive integer, got {value!r}.")
    return value


def split_suffix(pattern: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    """``mlp.experts.*.gate_proj.weight_scale_inv`` -> (``mlp.experts.*.gate_proj.``, ``weight_scale_inv``)."""
    for suffix in sorted(suffixes, key=len, reverse=True):
        if pattern.endswith(suffix):
            return pattern[: -len(suffix)], suffix
    return pattern, ""


def by_base(parts: dict[str, StoredPart], suffixes: tuple[str, ...]) -> dict[str, dict[str, StoredPart]]:
    """The stored tensors grouped by the weight they belong to (``base``), each keyed by its suffix, in the
    converter's order (one base per projection: gate, up...)."""
    bases: dict[str, dict[str, StoredPart]] = {}
    for pattern, part in parts.items():
        base, suffix = split_suffix(pattern, suffixes)
        bases.setdefault(base, {})[suffix] = part
    return bases
