"""How one model tensor (or one expert's slice of it) is built from checkpoint tensors, and reading it.

A :class:`TensorRecipe` names the checkpoint tensors (or one expert's rows of them, :class:`Source`) that make
a target parameter, transformers' converter that combines them, and, for experts kept in a compact stored form,
the :class:`~moe_patch.formats.StoredLayout` that decodes them. :class:`RecipeReader` reads a recipe through the
checkpoint's positional reads: stored bytes straight into a cache slot, plain tensors straight into their
destination when the conversion is only stacking and row concatenation, anything else through transformers' ops.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
)

from ..errors import CheckpointError
from ..formats import StoredLayout, StoredTensor, format_of_op
from ..io import Checkpoint, TensorEntry


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor, or one expert's part of it: row ``row`` (``split`` None) or chunk ``row``
    of ``split`` equal chunks along dimension 0 (DBRX stacks experts as ``[E * F, H]``)."""

    entry: TensorEntry
    row: int | None = None
    split: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape if self.row is None else self.entry.row_shape(self.split)

    @property
    def range(self) -> tuple[int, int]:
        e = self.entry
        return (e.start, e.end) if self.row is None else e.row_range(self.row, self.split)

    @property
    def nbytes(self) -> int:
        start, end = self.range
        return end - start


@dataclass(frozen=True)
class TensorRecipe:
    """How to build one model tensor (or one expert's slice of it) from checkpoint tensors.

    ``parts`` maps each converter source pattern (or the checkpoint key, for a plain rename) to the
    checkpoint tensors it collects, in transformers' order. ``stored`` is set when the tensors are
    quantized and decoded by moe-patch: its pieces index the flat list :attr:`sources`.
    """

    target: str
    parts: tuple[tuple[str, tuple[Source, ...]], ...]
    converter: WeightConverter | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored: StoredLayout | None = None

    @property
    def sources(self) -> list[Source]:
        return [s for _, group in self.parts for s in group]

    @property
    def entries(self) -> list[TensorEntry]:
        return [s.entry for s in self.sources]

    @property
    def nbytes(self) -> int:
        """Bytes read from disk for this recipe (the stored bytes)."""
        return sum(s.nbytes for s in self.sources)

    @property
    def model_nbytes(self) -> int:
        """Bytes of the tensor it builds, in the model dtype."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def operations(self) -> list:
        """The converter's operations moe-patch runs itself (its dequantize op is replaced by ``stored``)."""
        ops = list(self.converter.operations) if self.converter is not None else []
        return ops[1:] if ops and format_of_op(ops[0]) is not None and self.stored is not None else ops


class _ShapeShim:
    """Stands in for the model in converter ops that look the target up (``Transpose(check_dims=True)``,
    compressed-tensors' dtype lookup): a meta tensor of the target's shape and dtype."""

    def __init__(self, shape, dtype=torch.float32):
        self._t = torch.empty(shape, device="meta", dtype=dtype)

    def get_parameter(self, name):
        return self._t


def apply_recipe(recipe: TensorRecipe, tensors: list[list[torch.Tensor]], *, per_expert: bool) -> torch.Tensor:
    """Run ``recipe``'s conversion on loaded ``tensors`` (one list per part, in ``parts`` order).

    ``per_expert``: the tensors are one expert's (the output loses the expert dimension).
    Works on meta tensors too, which is how shapes are checked before reading.
    """
    if recipe.stored is not None:
        decoded = recipe.stored.decode(tuple(t for group in tensors for t in group))
        return decoded
    conv = recipe.converter
    if conv is None:
        (t,) = tensors[0]
        return t
    merges = any(isinstance(op, MergeModulelist) for op in conv.operations)
    input_dict = {}
    for (pattern, _), group in zip(recipe.parts, tensors):
        # A row of an already-fused tensor keeps a batch dimension of one so the ops see [1, ...].
        input_dict[pattern] = list(group) if (merges or not per_expert) else [t.unsqueeze(0) for t in group]
    shim_shape = ((1,) if per_expert else ()) + recipe.shape
    out = input_dict
    for op in recipe.operations:
        out = op.convert(
            out,
            source_patterns=conv.source_patterns,
            target_patterns=conv.target_patterns,
            full_layer_name=recipe.target,
            model=_ShapeShim(shim_shape, recipe.dtype),
            config=None,
            missing_keys=None,
        )
    if len(out) != 1:
        wanted = recipe.target.rpartition(".")[2]
        out = {k: v for k, v in out.items() if k.endswith(wanted)}
    (result,) = out.values()
    if isinstance(result, list):
        (result,) = result
    return result.squeeze(0) if per_expert else result


class RecipeReader:
    """Reads recipes from one checkpoint (one per-thread scratch buffer for casting loads)."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._scratch = threading.local()

    # -- reading -----------------------------------------------------------------------------
    def _read_sources(self, recipe: TensorRecipe, views: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        out = []
        for i, s in enumerate(recipe.sources):
            start, end = s.range
            buf = views[i] if views is not None else None
            raw = self.checkpoint.read_bytes(
                s.entry,
                start,
                end,
                out=buf.view(-1).view(torch.uint8) if buf is not None else None,
                align=s.entry.dtype.itemsize,
            )
            out.append(buf if buf is not None else raw.view(s.entry.dtype).reshape(s.shape))
        return out

    def load_stored(self, recipe: TensorRecipe, slot=None) -> StoredTensor:
        """One expert's stored tensors (into views of a pool ``slot`` when given), not decoded. Their scales are
        checked here, where they enter: a NaN or inf scale would decode to NaN or silently wrong values."""
        views = [slot.tensor(s.shape, s.entry.dtype) for s in recipe.sources] if slot is not None else None
        tensors = tuple(self._read_sources(recipe, views))
        bad = recipe.stored.nonfinite(tensors)
        if bad is not None:
            s = recipe.sources[bad]
            part = f" (expert {s.row})" if s.row is not None else ""
            raise CheckpointError(
                f"{s.entry.file}: tensor {s.entry.key!r}{part} holds non-finite values (NaN or inf) where "
                f"{recipe.target!r} needs finite scales; the checkpoint is corrupt. Re-download this shard."
            )
        return StoredTensor(recipe.stored, tensors)

    def load_into(self, recipe: TensorRecipe, out: torch.Tensor) -> None:
        """Read one expert's ``recipe`` into ``out`` (e.g. a pool slot) without temporaries.

        When the conversion is only stacking and ``[gate; up]`` concatenation, the bytes go straight
        from disk into ``out`` (or, when the dtype differs, into a per-thread scratch buffer that
        ``copy_`` casts into ``out``); other conversions run transformers' ops and copy the result.
        """
        conv = recipe.converter
        simple = recipe.stored is None and (
            conv is None
            or all(
                isinstance(op, MergeModulelist) or (isinstance(op, Concatenate) and op.dim == 1)
                for op in conv.operations
            )
        )
        dtypes = {e.dtype for e in recipe.entries}
        if not simple or len(dtypes) != 1:
            out.copy_(self.load(recipe, per_expert=True))
            return
        (stored,) = dtypes
        nbytes = recipe.nbytes
        if stored == out.dtype:
            flat = out.view(-1).view(torch.uint8)
        else:
            scratch = getattr(self._scratch, "buf", None)
            if scratch is None or scratch.numel() < nbytes:
                scratch = self._scratch.buf = torch.empty(nbytes, dtype=torch.uint8)
            flat = scratch[:nbytes]
        at = 0
        for s in recipe.sources:  # parts follow the converter's source order: gate rows, then up rows
            start, end = s.range
            self.checkpoint.read_bytes(s.entry, start, end, out=flat.narrow(0, at, end - start))
            at += end - start
        if stored != out.dtype:
            out.copy_(flat.view(stored).view(out.shape))

    def load(self, recipe: TensorRecipe, *, per_expert: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read and convert ``recipe`` (decoded if quantized, cast to ``dtype``, default the model's)."""
        if recipe.stored is not None:
            stored = self.load_stored(recipe)
            return stored.layout.decode(stored.tensors, dtype=dtype or recipe.dtype)
        tensors = [[self.checkpoint.read(s.entry, s.row, split=s.split) for s in group] for _, group in recipe.parts]
        out = apply_recipe(recipe, tensors, per_expert=per_expert)
        return out.to(dtype or recipe.dtype).contiguous()
