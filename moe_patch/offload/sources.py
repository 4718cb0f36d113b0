"""Where experts come from when no cache holds them: the checkpoint on disk, or the model's own RAM.

A source returns one expert's tensors on the CPU in the model dtype; it owns no cache and no policy.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .keymap import CheckpointMap
from .layers import OffloadLayer


class ExpertSource(Protocol):
    tier: str  # the statistics tier its reads count in: "disk" or "host"

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...


class CheckpointSource:
    """Reads one expert at a time from the checkpoint's safetensors, converted as transformers would."""

    tier = "disk"

    def __init__(self, cmap: CheckpointMap):
        self.cmap = cmap

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        return {name: self.cmap.load(r, per_expert=True) for name, r in self.cmap.experts[(layer, expert)].items()}

    def read_into(self, layer: int, expert: int, slot) -> dict[str, torch.Tensor]:
        """Like :meth:`read`, into views of a pool slot (no allocation)."""
        out = {}
        for name, r in self.cmap.experts[(layer, expert)].items():
            out[name] = slot.tensor(r.shape, r.dtype)
            self.cmap.load_into(r, out[name])
        return out

    def nbytes(self, layer: int, expert: int) -> int:
        return sum(r.nbytes for r in self.cmap.experts[(layer, expert)].values())

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

    def read(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        spec, params = self.layers[layer], self.originals[layer]
        if spec.storage == "fused":
            return {n: params[n][expert] for n in spec.param_names}
        return {n: params[f"{expert}.{n}"] for n in spec.param_names}

    def close(self) -> None:
        pass
