"""Where experts come from when no cache holds them: the checkpoint on disk, or the model's own RAM.

A source returns one expert's tensors on the CPU in the model dtype; it owns no cache and no policy.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..formats import StoredTensor
from .keymap import CheckpointMap
from .layers import OffloadLayer


class ExpertSource(Protocol):
    tier: str  # the statistics tier its reads count in: "disk" or "host"

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...


class CheckpointSource:
    """Reads one expert at a time from the checkpoint's safetensors, converted as transformers would.

    Experts of quantized checkpoints come back in their stored bytes (:class:`StoredTensor`) from
    :meth:`read_into`, the engine's path; :meth:`read` always returns them decoded, in the model dtype.
    """

    tier = "disk"

    def __init__(self, cmap: CheckpointMap):
        self.cmap = cmap

    @property
    def stored(self) -> bool:
        """Whether experts are read in a quantized stored format (decoded where they are computed)."""
        return self.cmap.stored_experts

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {name: self.cmap.load(r, per_expert=True) for name, r in self.cmap.experts[(layer, expert)].items()}

    def read_into(self, layer: int, expert: int, slot=None) -> dict[str, torch.Tensor | StoredTensor]:
        """One expert as the caches hold it: stored bytes for quantized experts, the model dtype otherwise;
        into views of a pool ``slot`` when given (no allocation)."""
        out: dict[str, torch.Tensor | StoredTensor] = {}
        for name, r in self.cmap.experts[(layer, expert)].items():
            if r.stored is not None:
                out[name] = self.cmap.load_stored(r, slot)
            else:
                out[name] = slot.tensor(r.shape, r.dtype) if slot is not None else torch.empty(r.shape, dtype=r.dtype)
                self.cmap.load_into(r, out[name])
        return out

    def read_to(self, layer: int, expert: int, out: dict[str, torch.Tensor]) -> None:
        """One expert decoded into the tensors ``out`` (a device slot's views), in the model dtype."""
        for name, r in self.cmap.experts[(layer, expert)].items():
            if r.stored is not None:
                stored = self.cmap.load_stored(r)
                stored.dequantize(out=out[name].t() if r.stored.transpose else out[name])
            else:
                self.cmap.load_into(r, out[name])

    def nbytes(self, layer: int, expert: int) -> int:
        """Bytes :meth:`read_into` fills (stored bytes for quantized experts)."""
        return sum(r.nbytes if r.stored is not None else r.model_nbytes
                   for r in self.cmap.experts[(layer, expert)].values())

    def slot_bytes(self, layer: int, expert: int = 0) -> int:
        """Slot size that holds what :meth:`read_into` writes, with its alignment padding."""
        from .pool import aligned

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

    def close(self) -> None:
        pass
