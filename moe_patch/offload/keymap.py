"""Map checkpoint tensors to model parameters with transformers' own conversion rules, one expert at a time.

transformers 5 loads MoE checkpoints by renaming keys and running a ``WeightConverter`` per fused
parameter (``MergeModulelist`` stacks per-expert tensors, ``Concatenate`` builds ``[gate; up]``,
``Transpose``/``Interleave`` fix layouts). Here the same rules (``get_model_conversion_mapping``,
``rename_source_key``, ``dot_natural_key``) are applied to the checkpoint's key list, and each
converter's operations are run on the tensors of *one* expert (a batch of one along the expert
dimension), which gives exactly row ``e`` of the fully converted parameter without building it.

Everything is checked here against the model's parameter shapes, with meta tensors, before any
data is read: a missing tensor or a shape mismatch is a :class:`CheckpointError` naming the file
and tensor.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Chunk,
    Concatenate,
    Interleave,
    MergeModulelist,
    Transpose,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from ..errors import CheckpointError, MoEConfigError
from .checkpoint import Checkpoint, TensorEntry
from .layers import OffloadLayer

logger = logging.getLogger(__name__)

#: Converter operations that act on each expert independently (they never mix rows of dim 0).
_PER_EXPERT_OPS = (MergeModulelist, Concatenate, Transpose, Interleave, Chunk)


@dataclass(frozen=True)
class TensorRecipe:
    """How to build one model tensor (or one expert's slice of it) from checkpoint tensors.

    ``parts`` maps each converter source pattern (or the checkpoint key, for a plain rename) to the
    checkpoint tensors it collects, in transformers' order, each with the row to read (``None`` for
    the whole tensor).
    """

    target: str
    parts: tuple[tuple[str, tuple[tuple[TensorEntry, int | None], ...]], ...]
    converter: WeightConverter | None
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def entries(self) -> list[TensorEntry]:
        return [entry for _, group in self.parts for entry, _ in group]

    @property
    def nbytes(self) -> int:
        """Bytes read from disk for this recipe."""
        total = 0
        for _, group in self.parts:
            for entry, row in group:
                total += entry.nbytes if row is None else entry.nbytes // entry.shape[0]
        return total


class _ShapeShim:
    """Stands in for the model in ``Transpose(check_dims=True)``: the shape of the batch of one."""

    def __init__(self, shape):
        self._t = torch.empty(shape, device="meta")

    def get_parameter(self, name):
        return self._t


def apply_recipe(recipe: TensorRecipe, tensors: list[list[torch.Tensor]], *, per_expert: bool) -> torch.Tensor:
    """Run ``recipe``'s conversion on loaded ``tensors`` (one list per part, in ``parts`` order).

    ``per_expert``: the tensors are one expert's (the output loses the expert dimension).
    Works on meta tensors too, which is how shapes are checked before reading.
    """
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
    for op in conv.operations:
        out = op.convert(
            out, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
            full_layer_name=recipe.target, model=_ShapeShim(shim_shape), config=None, missing_keys=None,
        )
    if len(out) != 1:
        wanted = recipe.target.rpartition(".")[2]
        out = {k: v for k, v in out.items() if k.endswith(wanted)}
    (result,) = out.values()
    if isinstance(result, list):
        (result,) = result
    return result.squeeze(0) if per_expert else result


def _expert_number_position(keys: list[str]) -> int | None:
    """Index of the dotted component that holds the expert number (the one digit field that varies)."""
    split = [k.split(".") for k in keys]
    if len(split) < 2 or len({len(s) for s in split}) != 1:
        return None
    varying = [i for i in range(len(split[0])) if len({s[i] for s in split}) > 1]
    if len(varying) == 1 and all(s[varying[0]].isdigit() for s in split):
        return varying[0]
    return None


class CheckpointMap:
    """Every model tensor's recipe: per expert for offloaded layers, whole for everything else."""

    def __init__(self, checkpoint: Checkpoint, model: torch.nn.Module, layers: list[OffloadLayer]):
        self.checkpoint = checkpoint
        self._scratch = threading.local()  # per-thread read buffer for casting loads
        meta = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(model, "base_model_prefix", None)
        # target key -> (converter or None, {pattern: [keys]}), mirroring convert_and_load_state_dict_in_model
        groups: dict[str, tuple[WeightConverter | None, dict[str, list[str]]]] = {}
        self.unexpected: list[str] = []
        for key in sorted(checkpoint.keys(), key=dot_natural_key):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if renamed not in meta and key in meta:
                renamed, pattern = rename_source_key(key, [], [], prefix, meta)
            if renamed not in meta:
                self.unexpected.append(key)
                continue
            conv = by_pattern[pattern] if pattern is not None else None
            slot = groups.setdefault(renamed, (conv, {}))
            slot[1].setdefault(pattern if pattern is not None else key, []).append(key)
        self._groups = groups
        self._meta = meta
        self.layers = layers
        self.experts: dict[tuple[int, int], dict[str, TensorRecipe]] = {}
        expert_targets: set[str] = set()
        for layer in layers:
            for e in range(layer.num_experts):
                self.experts[(layer.index, e)] = {}
            for name in layer.param_names:
                if layer.storage == "fused":
                    target = f"{layer.experts_path}.{name}"
                    expert_targets.add(target)
                    for e, recipe in enumerate(self._fused_recipes(layer, name, target)):
                        self.experts[(layer.index, e)][name] = recipe
                else:
                    for e in range(layer.num_experts):
                        target = f"{layer.experts_path}.{e}.{name}"
                        expert_targets.add(target)
                        self.experts[(layer.index, e)][name] = self._whole_recipe(target, per_expert_shape=layer.shapes[name])
        self.dense: dict[str, TensorRecipe] = {
            t: self._whole_recipe(t) for t in groups if t not in expert_targets
        }
        self.missing = sorted(k for k in meta if k not in groups and k not in expert_targets)
        if self.unexpected:
            logger.debug("checkpoint tensors not used by the model: %s", self.unexpected[:10])
        self.validate()

    # -- recipes -----------------------------------------------------------------------------
    def _group(self, target: str) -> tuple[WeightConverter | None, dict[str, list[str]]]:
        if target not in self._groups:
            raise CheckpointError(
                f"{self.checkpoint.directory}: no checkpoint tensor maps to model parameter {target!r} under "
                "transformers' conversion rules for this model. The checkpoint is incomplete or belongs to "
                "another architecture."
            )
        return self._groups[target]

    def _whole_recipe(self, target: str, per_expert_shape: tuple[int, ...] | None = None) -> TensorRecipe:
        conv, parts = self._group(target)
        shape, dtype = self._meta[target]
        if conv is not None:
            bad = [op for op in conv.operations if not isinstance(op, _PER_EXPERT_OPS)] if per_expert_shape else []
            if bad:
                raise MoEConfigError(f"{target}: conversion {type(bad[0]).__name__} cannot be applied per expert.")
        entries = tuple((p, tuple((self.checkpoint.entries[k], None) for k in keys)) for p, keys in parts.items())
        return TensorRecipe(target, entries, conv, shape if per_expert_shape is None else per_expert_shape, dtype)

    def _fused_recipes(self, layer: OffloadLayer, name: str, target: str) -> list[TensorRecipe]:
        conv, parts = self._group(target)
        n, shape, dtype = layer.num_experts, layer.shapes[name], layer.dtype
        if conv is not None:
            for op in conv.operations:
                if not isinstance(op, _PER_EXPERT_OPS) or (not isinstance(op, MergeModulelist) and getattr(op, "dim", 1) == 0):
                    raise MoEConfigError(
                        f"{target}: transformers converts it with {type(op).__name__}, which moe-patch cannot apply one "
                        "expert at a time. Load this model without offloading."
                    )
        patterns = list(conv.source_patterns) if conv is not None else list(parts)
        per_expert_keys = conv is not None and any(isinstance(op, MergeModulelist) for op in conv.operations)
        rows: dict[str, list[tuple[TensorEntry, int | None]]] = {}
        for pattern in patterns:
            keys = parts.get(pattern)
            if not keys:
                raise CheckpointError(
                    f"{self.checkpoint.directory}: no checkpoint tensor matches {pattern!r}, needed for {target!r}."
                )
            entries = [self.checkpoint.entries[k] for k in keys]
            if per_expert_keys:
                rows[pattern] = self._numbered(entries, n, target)
            else:
                if len(entries) != 1:
                    raise CheckpointError(f"{target}: expected one fused tensor, found {[e.key for e in entries]}.")
                (entry,) = entries
                if not entry.shape or entry.shape[0] != n:
                    raise CheckpointError(
                        f"{entry.file}: tensor {entry.key!r} has shape {list(entry.shape)}; {target!r} needs "
                        f"{n} experts along dimension 0. The checkpoint does not match the config."
                    )
                rows[pattern] = [(entry, e) for e in range(n)]
        return [
            TensorRecipe(target, tuple((p, (rows[p][e],)) for p in patterns), conv, shape, dtype) for e in range(n)
        ]

    def _numbered(self, entries: list[TensorEntry], n: int, target: str) -> list[tuple[TensorEntry, None]]:
        pos = _expert_number_position([e.key for e in entries])
        if pos is None:
            numbers = list(range(len(entries)))  # transformers stacks them in sorted order
        else:
            numbers = [int(e.key.split(".")[pos]) for e in entries]
        found = dict(zip(numbers, entries))
        missing = [i for i in range(n) if i not in found]
        if missing or len(found) != n:
            example = entries[0]
            if pos is not None and missing:
                parts = example.key.split(".")
                parts[pos] = str(missing[0])
                name = ".".join(parts)
            else:
                name = f"expert {missing[0] if missing else n}"
            raise CheckpointError(
                f"{self.checkpoint.directory}: tensor {name!r} is absent from the checkpoint ({len(found)} of {n} "
                f"experts found for {target!r}; missing experts {missing[:8]}). Re-download the checkpoint or "
                "check num_experts in config.json."
            )
        return [(found[i], None) for i in range(n)]

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Shapes and dtypes of every recipe against the model, on meta tensors (no data read)."""
        for key, recipes in self.experts.items():
            for recipe in recipes.values():
                self._check(recipe, per_expert=True)
        for recipe in self.dense.values():
            self._check(recipe, per_expert=False)

    def _check(self, recipe: TensorRecipe, *, per_expert: bool) -> None:
        for entry in recipe.entries:
            if recipe.dtype.is_floating_point and not entry.dtype.is_floating_point:
                raise CheckpointError(
                    f"{entry.file}: tensor {entry.key!r} is stored as {entry.dtype} but {recipe.target!r} is "
                    f"{recipe.dtype}: the checkpoint does not match the config (quantized checkpoint?)."
                )
        metas = [
            [torch.empty(e.shape if r is None else e.shape[1:], dtype=e.dtype, device="meta") for e, r in group]
            for _, group in recipe.parts
        ]
        try:
            shape = tuple(apply_recipe(recipe, metas, per_expert=per_expert).shape)
        except (RuntimeError, ValueError, IndexError) as exc:
            shape = f"(conversion failed: {exc})"
        if shape != recipe.shape:
            first = recipe.entries[0]
            raise CheckpointError(
                f"{first.file}: tensor {first.key!r} (shape {list(first.shape)}, {first.dtype}) gives "
                f"{recipe.target!r} shape {list(shape) if isinstance(shape, tuple) else shape}"
                f"{' per expert' if per_expert else ''} but the config needs {list(recipe.shape)}. The checkpoint "
                "does not match config.json."
            )

    # -- reading -----------------------------------------------------------------------------
    def load_into(self, recipe: TensorRecipe, out: torch.Tensor) -> None:
        """Read one expert's ``recipe`` into ``out`` (e.g. a pool slot) without temporaries.

        When the conversion is only stacking and ``[gate; up]`` concatenation, the bytes go straight
        from disk into ``out`` (or, when the dtype differs, into a per-thread scratch buffer that
        ``copy_`` casts into ``out``); other conversions run transformers' ops and copy the result.
        """
        conv = recipe.converter
        simple = conv is None or all(
            isinstance(op, MergeModulelist) or (isinstance(op, Concatenate) and op.dim == 1) for op in conv.operations
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
        for _, group in recipe.parts:  # parts follow the converter's source order: gate rows, then up rows
            for entry, row in group:
                start, end = (entry.start, entry.end) if row is None else entry.row_range(row)
                self.checkpoint.read_bytes(entry, start, end, out=flat.narrow(0, at, end - start))
                at += end - start
        if stored != out.dtype:
            out.copy_(flat.view(stored).view(out.shape))

    def load(self, recipe: TensorRecipe, *, per_expert: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read and convert ``recipe`` (cast to ``dtype``, default the model's)."""
        tensors = [[self.checkpoint.read(e, r) for e, r in group] for _, group in recipe.parts]
        out = apply_recipe(recipe, tensors, per_expert=per_expert)
        return out.to(dtype or recipe.dtype).contiguous()
