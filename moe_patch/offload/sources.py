"""Where experts come from when no cache holds them: the checkpoint on disk, or the model's own RAM.

A source returns one expert's tensors on the CPU; it owns no cache and no policy. Both sources implement the
whole :class:`ExpertSource` protocol, which is all the engine asks of them.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..formats import StoredTensor
from .keymap import CheckpointMap
from .layers import OffloadLayer
from .pool import aligned, tensors_slot_bytes


class ExpertSource(Protocol):
    #: the statistics tier its reads count in: "disk" or "host"
    tier: str
    #: experts come in a compact stored form (quantized, or another float dtype) decoded where computed
    stored: bool
    #: reads fill the caller's pool slots (False: the source hands out memory it already holds)
    reads_into_slots: bool

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert decoded, in the model dtype."""

    def read_into(self, layer: int, expert: int, slot=None) -> dict[str, torch.Tensor | StoredTensor]:
        """One expert as the caches hold it (stored bytes for stored experts), into a pool ``slot`` if given."""

    def read_to(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        """One expert decoded into the tensors ``out`` (a device slot's views)."""

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes :meth:`read_into` gives (stored bytes for stored experts)."""

    def example(self, layer: int) -> dict[str, torch.Tensor | StoredTensor]:
        """What :meth:`read_into` gives for an expert of ``layer``, as meta tensors (nothing is read)."""

    def slot_bytes(self, layer: int, expert: int = 0) -> int:
        """A pool slot that holds what :meth:`read_into` writes, with its alignment padding."""

    def close(self) -> None:
        """Release files."""


class CheckpointSource:
    """Reads one expert at a time from the checkpoint's safetensors, converted as transformers would.

    Experts of quantized checkpoints come back in their stored bytes (:class:`StoredTensor`) from
    :meth:`read_into`, the engine's path; :meth:`read` always returns them decoded, in the model dtype.
    """

    tier = "disk"
    reads_into_slots = True

    def __init__(self, cmap: CheckpointMap):
        self.cmap = cmap

    @property
    def stored(self) -> bool:
        """Whether experts are read in a quantized stored format (decoded where they are computed)."""
        return self.cmap.stored_experts

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {
            name: self.cmap.reader.load(r, per_expert=True) for name, r in self.cmap.experts[(layer, expert)].items()
        }

    def read_into(self, layer: int, expert: int, slot=None) -> dict[str, torch.Tensor | StoredTensor]:
        """One expert as the caches hold it: stored bytes for quantized experts, the model dtype otherwise;
        into views of a pool ``slot`` when given (no allocation)."""
        out: dict[str, torch.Tensor | StoredTensor] = {}
        for name, r in self.cmap.experts[(layer, expert)].items():
            if r.stored is not None:
                out[name] = self.cmap.reader.load_stored(r, slot)
            else:
                out[name] = slot.tensor(r.shape, r.dtype) if slot is not None else torch.empty(r.shape, dtype=r.dtype)
                self.cmap.reader.load_into(r, out[name])
        return out

    def example(self, layer: int) -> dict[str, torch.Tensor | StoredTensor]:
        out: dict[str, torch.Tensor | StoredTensor] = {}
        for name, r in self.cmap.experts[(layer, 0)].items():
            if r.stored is not None:
                out[name] = StoredTensor(
                    r.stored, tuple(torch.empty(s.shape, dtype=s.entry.dtype, device="meta") for s in r.sources)
                )
            else:
                out[name] = torch.empty(r.shape, dtype=r.dtype, device="meta")
        return out

    def read_to(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        """One expert decoded into the tensors ``out`` (a device slot's views), in the model dtype."""
        for name, r in self.cmap.experts[(layer, expert)].items():
            if r.stored is not None:
                stored = self.cmap.reader.load_stored(r)
                stored.dequantize(out=out[name].t() if r.stored.transpose else out[name])
            else:
                self.cmap.reader.load_into(r, out[name])

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes :meth:`read_into` fills (stored bytes for quantized experts)."""
        return sum(
            r.nbytes if r.stored is not None else r.model_nbytes for r in self.cmap.experts[(layer, expert)].values()
        )

    def slot_bytes(self, layer: int, expert: int = 0) -> int:
        """Slot size that holds what :meth:`read_into` writes, with its alignment padding."""
        total = 0
        for r in self.cmap.experts[(layer, expert)].values():
            if r.stored is not None:
                total += sum(aligned(s.nbytes) for s in r.sources)
            else:
                total += aligned(r.model_nbytes)
        return total

    def close(self) -> None:
        self.cmap.checkpoint.close()


class MemorySource:
    """The experts of a model that is already loaded on the CPU (``patch_model(model, offload=...)``).

    Holds the original parameters so ``detach()`` can put them back; the caches then stage experts
    towards the device (the host RAM the parameters live in is the bottom tier).
    """

    tier = "host"
    stored = False
    reads_into_slots = False  # its reads are views of the parameters it keeps: no copy, no pool

    def __init__(self, layers: list[OffloadLayer], originals: dict[int, dict[str, torch.Tensor]]):
        self.layers = layers
        self.originals = originals  # layer index -> {param path inside the experts module: tensor}

    def read_to(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        for name, t in self.read(layer, expert).items():
            out[name].copy_(t)

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        spec, params = self.layers[layer], self.originals[layer]
        out = {}
        for n in spec.param_names:
            own = spec.expert_param_path(expert, n)
            out[n] = spec.expert_slice(params[n], expert) if own is None else params[own]
        return out

    def read_into(self, layer: int, expert: int, slot=None) -> dict[str, torch.Tensor]:
        return self.read(layer, expert)

    def example(self, layer: int) -> dict[str, torch.Tensor]:
        spec = self.layers[layer]
        return {n: torch.empty(spec.shapes[n], dtype=spec.dtype, device="meta") for n in spec.param_names}

    def nbytes(self, layer: int, expert: int) -> int:
        return self.layers[layer].expert_bytes

    def slot_bytes(self, layer: int, expert: int = 0) -> int:
        spec = self.layers[layer]
        return tensors_slot_bytes(spec.shapes.values(), spec.dtype)

    def close(self) -> None:
        pass
