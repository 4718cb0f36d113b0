"""Map checkpoint tensors to model parameters with transformers' own conversion rules, one expert at a time.

transformers 5 loads MoE checkpoints by renaming keys and running a ``WeightConverter`` per fused
parameter (``MergeModulelist`` stacks per-expert tensors, ``Concatenate`` builds ``[gate; up]``,
``Transpose``/``Interleave`` fix layouts). Here the same rules (``get_model_conversion_mapping``,
``rename_source_key``, ``dot_natural_key``) are applied to the checkpoint's key list, and each
converter's operations are run on the tensors of *one* expert (a batch of one along the expert
dimension), which gives exactly row ``e`` of the fully converted parameter without building it.

Quantized checkpoints (FP8, MXFP4, compressed-tensors) go through the conversions of transformers'
own quantizer in its ``dequantize=True`` mode, so the same rules also say which stored tensors
(weights, block scales, FP4 blocks) make each parameter. Their dequantize step is replaced by
:class:`~moe_patch.formats.StoredLayout`: routed experts stay in their stored bytes (read into
the caches as stored, decoded where they are computed), FP8 weights use the config's block size
(transformers' ``Fp8Dequantize`` guesses it from the shapes, wrongly when a dimension is not a
multiple of 128). Other dense tensors of compressed-tensors checkpoints use transformers' own op.

Everything is checked here against the model's parameter shapes, with meta tensors, before any
data is read: a missing tensor, a missing scale or a shape mismatch is a :class:`CheckpointError`
naming the file and tensor.
"""

from __future__ import annotations

import logging

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
from ..formats import (
    CAST,
    Format,
    QuantizationSpec,
    StoredLayout,
    StoredPart,
    claimed_by,
    format_of_op,
)
from ..formats.hf import make_quantizer
from ..io import Checkpoint, TensorEntry
from .layers import OffloadLayer
from .recipes import RecipeReader, Source, TensorRecipe, apply_recipe

logger = logging.getLogger(__name__)

#: Converter operations that act on each expert independently (they never mix rows of dim 0).
_PER_EXPERT_OPS = (MergeModulelist, Concatenate, Transpose, Interleave, Chunk)


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
    """Every model tensor's recipe: per expert for offloaded layers, whole for everything else.

    ``quantization``: the checkpoint's :class:`QuantizationSpec` (``None`` for bf16/fp16/fp32).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        model: torch.nn.Module,
        layers: list[OffloadLayer],
        quantization: QuantizationSpec | None = None,
    ):
        self.checkpoint = checkpoint
        self.quantization = quantization
        self.reader = RecipeReader(checkpoint)  # the recipes' reads
        meta = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
        quantizer = make_quantizer(quantization.raw) if quantization is not None else None
        conversions = get_model_conversion_mapping(model, hf_quantizer=quantizer)
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
        if quantization is None:
            self._refuse_unlabelled(checkpoint)
        self._groups = groups
        self._meta = meta
        self.layers = layers
        self.experts: dict[tuple[int, int], dict[str, TensorRecipe]] = {}
        expert_targets: set[str] = set()
        for layer in layers:
            for e in range(layer.num_experts):
                self.experts[(layer.index, e)] = {}
            for name in layer.param_names:
                if layer.expert_param_path(0, name) is not None:  # each expert's tensors of its own
                    for e in range(layer.num_experts):
                        target = f"{layer.experts_path}.{layer.expert_param_path(e, name)}"
                        expert_targets.add(target)
                        self.experts[(layer.index, e)][name] = self._whole_recipe(
                            target, per_expert_shape=layer.shapes[name]
                        )
                else:
                    target = f"{layer.experts_path}.{name}"
                    expert_targets.add(target)
                    for e, recipe in enumerate(self._fused_recipes(layer, name, target)):
                        self.experts[(layer.index, e)][name] = recipe
        self.dense: dict[str, TensorRecipe] = {t: self._whole_recipe(t) for t in groups if t not in expert_targets}
        self.missing = sorted(k for k in meta if k not in groups and k not in expert_targets)
        if self.unexpected:
            logger.debug("checkpoint tensors not used by the model: %s", self.unexpected[:10])
        self.validate()

    @staticmethod
    def _refuse_unlabelled(checkpoint: Checkpoint) -> None:
        """Quantized tensors in a checkpoint whose config has no (or an empty) ``quantization_config``: reading
        FP8 or packed values as plain numbers, scales ignored, would generate garbage with exit 0."""
        for key, entry in checkpoint.entries.items():
            fmt = claimed_by(key, entry.dtype)
            if fmt is not None:
                raise MoEConfigError(
                    f"{entry.file}: tensor {key!r} ({str(entry.dtype).removeprefix('torch.')}) is {fmt.name}-quantized "
                    f"but {checkpoint.directory}/config.json has no quantization_config (or an empty one): restore "
                    f"the release's quantization_config (quant_method {fmt.method!r}) before loading."
                )

    # -- recipes -----------------------------------------------------------------------------
    def _group(self, target: str) -> tuple[WeightConverter | None, dict[str, list[str]]]:
        if target not in self._groups:
            raise CheckpointError(
                f"{self.checkpoint.directory}: no checkpoint tensor maps to model parameter {target!r} under "
                "transformers' conversion rules for this model. The checkpoint is incomplete or belongs to "
                "another architecture."
            )
        return self._groups[target]

    def _dequant(self, conv: WeightConverter | None) -> Format | None:
        """The format whose transformers dequantize op starts ``conv`` (None: not a dequantizing conversion)."""
        ops = conv.operations if conv is not None else []
        return format_of_op(ops[0]) if ops else None

    def _whole_recipe(self, target: str, per_expert_shape: tuple[int, ...] | None = None) -> TensorRecipe:
        conv, parts = self._group(target)
        shape, dtype = self._meta[target]
        shape = shape if per_expert_shape is None else per_expert_shape
        kind = self._dequant(conv)
        if conv is not None and per_expert_shape:
            ops = conv.operations[1:] if kind else conv.operations
            bad = [op for op in ops if not isinstance(op, _PER_EXPERT_OPS)]
            if bad:
                raise MoEConfigError(f"{target}: conversion {type(bad[0]).__name__} cannot be applied per expert.")
        sources = tuple((p, tuple(Source(self.checkpoint.entries[k]) for k in keys)) for p, keys in parts.items())
        if (
            kind is not None
            and kind.decodes_dense
            and per_expert_shape is None
            and not kind.stores_quantized([s.entry for _, group in sources for s in group])
        ):
            conv = None  # an unquantized tensor of an FP8 checkpoint (norm, embedding): used as stored
        recipe = TensorRecipe(target, sources, conv, shape, dtype)
        # every quantized routed expert, and dense tensors of the formats transformers decodes wrongly (FP8's
        # block guess), decode through moe-patch's layouts
        if conv is not None and kind is not None and (kind.decodes_dense or per_expert_shape is not None):
            recipe = self._with_layout(recipe, transpose=False)
        elif kind is None and per_expert_shape is not None:
            layout = self._cast_layout(recipe)
            if layout is not None:
                recipe = TensorRecipe(recipe.target, recipe.parts, recipe.converter, recipe.shape, recipe.dtype, layout)
        return recipe

    def _cast_layout(self, recipe: TensorRecipe) -> StoredLayout | None:
        """An expert stored in another float dtype than the model's (a bf16 checkpoint computed in fp32):
        kept in the caches as stored (half the bytes) and cast where it is computed, when its conversion
        is only stacking and row concatenation. None when the dtypes agree or the conversion is other."""
        parts = self._stored_parts(recipe)
        if not CAST.applies(list(parts.values()), recipe.shape, recipe.dtype):
            return None
        ops = list(recipe.converter.operations) if recipe.converter is not None else []
        if any(
            not isinstance(op, (MergeModulelist, Concatenate)) or (isinstance(op, Concatenate) and op.dim != 1)
            for op in ops
        ):
            return None
        pieces = tuple(CAST.pieces(None, recipe.target, recipe.shape, parts))
        return StoredLayout(pieces, CAST.scheme, recipe.shape, recipe.dtype)

    @staticmethod
    def _stored_parts(recipe: TensorRecipe) -> dict[str, StoredPart]:
        """The recipe's stored tensors keyed by their converter pattern (one per pattern for an expert)."""
        parts, at = {}, 0
        for pattern, group in recipe.parts:
            for s in group:
                parts[pattern if len(group) == 1 else f"{pattern}#{at}"] = StoredPart(at, s.entry, s.shape)
                at += 1
        return parts

    def _fused_recipes(self, layer: OffloadLayer, name: str, target: str) -> list[TensorRecipe]:
        conv, parts = self._group(target)
        n, shape, dtype = layer.num_experts, layer.shapes[name], layer.dtype
        kind = self._dequant(conv)
        if conv is not None:
            for op in conv.operations[1:] if kind else conv.operations:
                if not isinstance(op, _PER_EXPERT_OPS) or (
                    not isinstance(op, MergeModulelist) and getattr(op, "dim", 1) == 0
                ):
                    raise MoEConfigError(
                        f"{target}: transformers converts it with {type(op).__name__}, which moe-patch cannot "
                        "apply one expert at a time. Load this model without offloading."
                    )
        patterns = list(conv.source_patterns) if conv is not None else list(parts)
        if kind is not None:  # companions a checkpoint need not have (activation scales, zero points...)
            patterns = [p for p in patterns if parts.get(p)]
        per_expert_keys = conv is not None and any(isinstance(op, MergeModulelist) for op in conv.operations)
        split = layer.family.checkpoint_split(n)
        rows: dict[str, list[Source]] = {}
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
                if not entry.shape or entry.shape[0] % n or (split is None and entry.shape[0] != n):
                    raise CheckpointError(
                        f"{entry.file}: tensor {entry.key!r} has shape {list(entry.shape)}; {target!r} needs "
                        f"{n} experts along dimension 0. The checkpoint does not match the config."
                    )
                rows[pattern] = [Source(entry, e, split) for e in range(n)]
        recipes = [
            TensorRecipe(target, tuple((p, (rows[p][e],)) for p in patterns), conv, shape, dtype) for e in range(n)
        ]
        if kind is None:
            layout = self._cast_layout(recipes[0])
            if layout is not None:
                recipes = [TensorRecipe(r.target, r.parts, r.converter, r.shape, r.dtype, layout) for r in recipes]
        if kind is not None:
            # one layout for the layer, checked on expert 0; every other expert must store the same shapes
            layout = self._with_layout(recipes[0], transpose=kind.transposed).stored
            first = [(s.shape, s.entry.dtype) for s in recipes[0].sources]
            for r in recipes[1:]:
                for s, (shape, dtype) in zip(r.sources, first):
                    if (s.shape, s.entry.dtype) != (shape, dtype):
                        raise CheckpointError(
                            f"{s.entry.file}: tensor {s.entry.key!r} has shape {list(s.shape)} ({s.entry.dtype}) but "
                            f"the other experts store {list(shape)} ({dtype}). The checkpoint is corrupt."
                        )
            recipes = [TensorRecipe(r.target, r.parts, r.converter, r.shape, r.dtype, layout) for r in recipes]
        return recipes

    def _numbered(self, entries: list[TensorEntry], n: int, target: str) -> list[Source]:
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
        return [Source(found[i]) for i in range(n)]

    # -- quantized layouts ---------------------------------------------------------------------
    def _with_layout(self, recipe: TensorRecipe, *, transpose: bool) -> TensorRecipe:
        """``recipe`` with the :class:`StoredLayout` that decodes its stored tensors (checked here)."""
        q = self.quantization
        assert q is not None
        if any(len(group) != 1 for _, group in recipe.parts):
            raise MoEConfigError(
                f"{recipe.target}: expected one stored tensor per part, got {[len(g) for _, g in recipe.parts]}."
            )
        ops = list(recipe.converter.operations[1:]) if recipe.converter is not None else []
        concat = [op for op in ops if isinstance(op, Concatenate)]
        other = [op for op in ops if not isinstance(op, (MergeModulelist, Concatenate))]
        if other or any(op.dim != 1 for op in concat):
            raise MoEConfigError(
                f"{recipe.target}: quantized experts converted with {[type(op).__name__ for op in ops]} are not "
                "supported by the offload engine (only stacking and [gate; up] concatenation)."
            )
        pieces = q.format.pieces(q.experts, recipe.target, recipe.shape, self._stored_parts(recipe))
        layout = StoredLayout(tuple(pieces), q.experts, recipe.shape, recipe.dtype, transpose=transpose)
        stored_shape = (sum(p.rows for p in pieces), pieces[0].cols)
        if stored_shape != layout.stored_shape or len({p.cols for p in pieces}) != 1:
            first = recipe.sources[pieces[0].weight]
            raise CheckpointError(
                f"{first.entry.file}: tensor {first.entry.key!r} (shape {list(first.shape)}) decodes to "
                f"{list(stored_shape)} but {recipe.target!r} needs {list(layout.stored_shape)} "
                f"({q.method} layout). The checkpoint does not match config.json."
            )
        return TensorRecipe(recipe.target, recipe.parts, recipe.converter, recipe.shape, recipe.dtype, layout)

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Shapes and dtypes of every recipe against the model, on meta tensors (no data read)."""
        for recipes in self.experts.values():
            for recipe in recipes.values():
                self._check(recipe, per_expert=True)
        for recipe in self.dense.values():
            self._check(recipe, per_expert=False)

    def _check(self, recipe: TensorRecipe, *, per_expert: bool) -> None:
        if recipe.stored is not None:
            return  # the layout was checked against the target when it was built
        if self._dequant(recipe.converter) is not None:
            return  # transformers' own dequantize op needs data; the shape is checked after loading
        for entry in recipe.entries:
            if recipe.dtype.is_floating_point and not entry.dtype.is_floating_point:
                raise CheckpointError(
                    f"{entry.file}: tensor {entry.key!r} is stored as {entry.dtype} but {recipe.target!r} is "
                    f"{recipe.dtype}: the checkpoint does not match the config (quantized checkpoint without a "
                    "quantization_config?)."
                )
        metas = [[torch.empty(s.shape, dtype=s.entry.dtype, device="meta") for s in group] for _, group in recipe.parts]
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

    # -- sizes -------------------------------------------------------------------------------
    @property
    def stored_experts(self) -> bool:
        """Whether routed experts are kept in a quantized stored format (decoded where computed)."""
        return any(r.stored is not None for recipes in self.experts.values() for r in recipes.values())

    def stored_description(self) -> str | None:
        """How routed experts are stored when that differs from the model's tensors (None otherwise)."""
        if self.quantization is not None:
            return self.quantization.describe()
        for recipes in self.experts.values():
            for r in recipes.values():
                if r.stored is not None:
                    stored = str(r.sources[0].entry.dtype).removeprefix("torch.")
                    return f"{stored} (cast to {str(r.dtype).removeprefix('torch.')} where computed)"
        return None

    def expert_nbytes(self, layer: int, expert: int = 0, *, stored: bool = True) -> int:
        """Bytes of one expert as stored on disk (``stored``) or in the model dtype."""
        recipes = self.experts[(layer, expert)].values()
        return sum(r.nbytes if stored else r.model_nbytes for r in recipes)
