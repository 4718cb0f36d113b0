"""The device tier: fixed slots per expert layout (:mod:`.slab`), seen as one cache, and the entries tiers hold.

Layers whose experts share one layout (shapes, dtype, count, entry size) share one :class:`SlotGroup`: a slot
table and either a slab of compute-ready slots (one grouped GEMM over slot indices computes every cached
expert of a layer) or object slots (experts kept stored or cache-encoded, decoded at each use). The budget is
split between groups in proportion to their experts' total bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BudgetError
from ..formats import StoredTensor
from ..sizes import format_bytes
from .cache import Key
from .layers import OffloadLayer
from .policy import EvictionPolicy
from .slab import SlotTable, TensorSlab


@dataclass
class ExpertWeights:
    """One expert's tensors as a tier holds them (possibly stored or cache-encoded), with its size."""

    tensors: dict[str, torch.Tensor | StoredTensor]
    nbytes: int
    ready: Any = None  # CUDA event recorded after an async copy; None when usable at once
    tier: str = "disk"  # where it was read from the last time it entered the device tier
    slot: Any = None  # the pool slot holding the tensors (returned to the pool when this entry dies)
    moved: int = 0  # bytes moved to bring it into the device tier (stored bytes for quantized experts)


@dataclass
class SlotGroup:
    """The layers that share one device layout, their slot table and slab (or object slots)."""

    layers: list[int]
    table: SlotTable
    slab: TensorSlab | None  # compute-ready slots; None: object slots (stored / encoded entries)
    objects: list[ExpertWeights | None]

    def slot_id(self, slot: int) -> tuple[int, int]:
        """A key for ``slot`` of this group that the device backend files its copy events under."""
        return (id(self), slot)

    def entry(self, slot: int) -> dict[str, Any]:
        """The weights in ``slot`` as the compute takes them (views of the slab, or the object's tensors)."""
        if self.slab is not None:
            return self.slab.view(slot)
        return self.objects[slot].tensors


class DeviceTier:
    """The device slots of every layout group, seen as one cache (budget, peak, evictions, keys)."""

    def __init__(self, groups: list[SlotGroup], group_of: dict[int, SlotGroup], budget: int | None):
        self.groups, self.group_of, self.budget = groups, group_of, budget

    def __contains__(self, key: Key) -> bool:
        return key in self.group_of[key[0]].table

    def __len__(self) -> int:
        return sum(len(g.table) for g in self.groups)

    def keys(self) -> list[Key]:
        return [k for g in self.groups for k in g.table.keys()]

    @property
    def used(self) -> int:
        return sum(g.table.used for g in self.groups)

    @property
    def peak(self) -> int:
        return sum(g.table.peak for g in self.groups)

    @property
    def evictions(self) -> int:
        return sum(g.table.evictions for g in self.groups)

    def nbytes(self, key: Key) -> int:
        """Bytes the entry of ``key`` holds (its slot size)."""
        return self.group_of[key[0]].table.slot_bytes

    @property
    def capacity(self) -> int:
        return sum(g.table.capacity for g in self.groups)


def build_device_tier(
    layers: list[OffloadLayer],
    entry_bytes: dict[int, int],
    budget: int | None,
    policy: EvictionPolicy,
    hot: tuple[Key, ...],
    slab_dtype: torch.dtype | None,
    compute_ready: bool,
    device: torch.device,
) -> DeviceTier:
    """Slot groups for ``layers`` (``entry_bytes``: one entry's bytes per layer index; ``slab_dtype``: the
    dtype compute-ready slots keep experts in, None for the model's). On CUDA the slabs take their budget at
    attach, so an expert cache that does not fit next to the model is a :class:`BudgetError` now."""
    signatures: dict[Any, list[OffloadLayer]] = {}
    for layer in layers:
        sig = (tuple(sorted(layer.shapes.items())), layer.dtype, layer.num_experts, entry_bytes[layer.index])
        signatures.setdefault(sig, []).append(layer)
    totals = {sig: len(ls) * ls[0].num_experts * sig[3] for sig, ls in signatures.items()}
    groups, group_of = [], {}
    for sig, members in signatures.items():
        slot_bytes = sig[3]
        n_experts = len(members) * members[0].num_experts
        share = None if budget is None else int(budget * totals[sig] / sum(totals.values()))
        capacity = n_experts if share is None else max(1, min(n_experts, share // slot_bytes))
        table = SlotTable(
            [m.index for m in members],
            members[0].num_experts,
            capacity,
            slot_bytes,
            policy=policy,
            hot=hot,
            budget=share,
        )
        slab = _allocate_slab(members[0], capacity, slab_dtype or members[0].dtype, device) if compute_ready else None
        group = SlotGroup([m.index for m in members], table, slab, [None] * capacity)
        groups.append(group)
        group_of.update({m.index: group for m in members})
    return DeviceTier(groups, group_of, budget)


def _allocate_slab(layer: OffloadLayer, capacity: int, dtype: torch.dtype, device: torch.device) -> TensorSlab:
    """The slots of one layout, allocated up front (on CUDA the budget is taken at attach)."""
    try:
        return TensorSlab(layer.shapes, dtype, capacity, device)
    except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
        need = capacity * TensorSlab.nbytes_per_slot(layer.shapes, dtype)
        raise BudgetError(
            f"expert_cache: {capacity} expert slots ({format_bytes(need)}) do not fit in {device} memory "
            "next to the rest of the model; give a smaller expert_cache (e.g. what `moe-patch inspect --gpu` "
            "plans)."
        ) from exc
