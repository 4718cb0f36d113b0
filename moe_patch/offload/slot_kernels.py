"""The CPU kernels (:mod:`moe_patch.kernels`) over the engine's device slots, on CPU-only runs.

One :class:`~moe_patch.families.kernel.ExpertKernel` per slot group (and family maths): its entries are the
group's slots, so a layer's cached experts are one kernel call over slot indices, like the grouped GEMM they
replace. Slab slots are attached once (their views never move); object slots (experts kept in their stored
bytes) are attached when the entry in the slot changes, checked by identity before each call that reads them,
so an expert that leaves a slot is never read through a stale pointer. Where the kernels cannot run (no
compiler or ISA, ``MOE_PATCH_KERNELS=0``, a format or family they do not have) :meth:`SlotKernels.get` is None
and the engine keeps its torch path; the reason is logged once per group.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..families.kernel import ExpertKernel, layer_spec
from ..kernels import KernelUnavailableError, available
from .device_tier import SlotGroup
from .layers import OffloadLayer

logger = logging.getLogger(__name__)


def kernel_serves(layers: list[OffloadLayer], example: dict[int, dict[str, Any]]) -> bool:
    """Whether the kernels compute every layer from entries like ``example[layer.index]`` (meta tensors)."""
    if not available():
        return False
    return all(
        not isinstance(
            layer_spec(layer.family.kernel_maths(layer.experts), layer.num_experts, example[layer.index]), str
        )
        for layer in layers
    )


class GroupKernel:
    """The kernel over one slot group's slots."""

    def __init__(self, kernel: ExpertKernel, group: SlotGroup):
        self.kernel, self.group = kernel, group
        self.capacity = group.table.capacity
        self._held: list[weakref.ref | None] = [None] * self.capacity
        self._remap: dict[int, torch.Tensor] = {}
        if group.slab is not None:
            for s in range(self.capacity):
                kernel.attach(s, group.slab.view(s))

    def sync(self, slots: list[int]) -> None:
        """Attach the object entries now in ``slots`` (those that changed since they were last attached)."""
        if self.group.slab is not None:
            return
        for s in slots:
            obj = self.group.objects[s]
            ref = self._held[s]
            if ref is None or ref() is not obj:
                self.kernel.attach(s, obj.tensors)
                self._held[s] = weakref.ref(obj)

    def run(
        self,
        x: torch.Tensor,
        slot_of: dict[int, int] | tuple[torch.Tensor, torch.Tensor],
        num_experts: int,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        weight_inputs: bool = False,
    ) -> torch.Tensor:
        """The routed experts of ``x`` that sit in slots (``slot_of``: expert -> slot, or tensors of experts and
        their slots); every other routed expert is skipped. Adds into ``out`` when given."""
        remap = self._remap.get(num_experts)
        if remap is None:  # reused per layer width: a decode step makes no allocation here
            remap = self._remap[num_experts] = torch.empty(num_experts + 1, dtype=torch.int64)
        remap.fill_(self.capacity)  # not in a slot: skipped
        if isinstance(slot_of, dict):
            remap[list(slot_of)] = torch.tensor(list(slot_of.values()), dtype=torch.int64)
        else:
            remap[slot_of[0]] = slot_of[1]
        index = remap[top_k_index.clamp(0, num_experts)]
        return self.kernel.forward(
            x.contiguous(),
            index,
            top_k_weights.contiguous(),
            out,
            accumulate=out is not None,
            weight_inputs=weight_inputs,
        )


class SlotKernels:
    """The engine's kernels, one per slot group and family maths, built at first use (None where refused).

    Attributes:
        calls: kernel calls made (tests prove the kernel path ran).
    """

    def __init__(self, layers: list[OffloadLayer], device: torch.device, source: Any, encoded: bool = False):
        self.host_enabled = available() and not encoded  # host entries: stored bytes, or cache-encoded
        self.enabled = device.type == "cpu" and available()
        self.source = source
        self.encoded = encoded  # object slots hold cache-encoded experts (nf4/int8): no kernel reads those
        self._maths = (
            {layer.index: layer.family.kernel_maths(layer.experts) for layer in layers}
            if self.enabled or self.host_enabled
            else {}
        )
        self._kernels: dict[tuple[int, Any], GroupKernel | None] = {}
        self._host: dict[int, ExpertKernel | None] = {}
        self._host_lock = threading.Lock()

    @property
    def calls(self) -> int:
        return sum(g.kernel.calls for g in self._kernels.values() if g is not None)

    @property
    def host_calls(self) -> int:
        return sum(k.calls for k in self._host.values() if k is not None)

    def host(self, layer: OffloadLayer) -> ExpertKernel | None:
        """A one-entry kernel computing ``layer``'s host-tier entries on the CPU (a miss the cost model sends
        to the CPU: the entry is attached for the call and detached after), or None (torch computes it)."""
        if not self.host_enabled:
            return None
        if layer.index not in self._host:
            try:
                kernel = ExpertKernel(self._maths[layer.index], 1, self.source.example(layer.index), gemm_min_rows=None)
            except KernelUnavailableError as exc:
                logger.info("offload: %s host-tier experts computed by torch: %s", layer.experts_path, exc)
                kernel = None
            self._host[layer.index] = kernel
        return self._host[layer.index]

    def run_host(self, kernel: ExpertKernel, entry: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """One expert on rows ``x`` (CPU) from its host entry, unweighted (the caller combines)."""
        with self._host_lock:  # the one entry is shared by the forward's thread and the CPU-misses thread
            return self._run_host(kernel, entry, x)

    def _run_host(self, kernel: ExpertKernel, entry: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        kernel.attach(0, entry)
        try:
            rows = x.shape[0]
            return kernel.forward(
                x.contiguous(), torch.zeros(rows, 1, dtype=torch.int64), torch.ones(rows, 1, dtype=torch.float32)
            )
        finally:
            kernel.detach(0)

    def get(self, layer: OffloadLayer, group: SlotGroup) -> GroupKernel | None:
        """The kernel computing ``layer``'s experts from ``group``'s slots, or None (torch computes them)."""
        if not self.enabled:
            return None
        maths = self._maths[layer.index]
        key = (id(group), maths)
        if key in self._kernels:
            return self._kernels[key]
        if group.slab is None and self.encoded:
            logger.info(
                "offload: %s computed by torch: the CPU kernels do not read cache-encoded experts", layer.experts_path
            )
            self._kernels[key] = None
            return None
        example = group.slab.view(0) if group.slab is not None else self.source.example(layer.index)
        try:
            kernel = GroupKernel(ExpertKernel(maths, group.table.capacity, example), group)
        except (KernelUnavailableError, InvalidArgumentError) as exc:
            logger.info("offload: %s computed by torch, not the CPU kernels: %s", layer.experts_path, exc)
            kernel = None
        self._kernels[key] = kernel
        return kernel
