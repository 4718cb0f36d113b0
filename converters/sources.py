"""Where each output weight comes from: one dense model, several fine-tunes (Branch-Train-MiX), or a
base model plus one LoRA adapter per expert. Returns fp32 tensors; no recipe maths here."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_patch.errors import CheckpointError

from .checkpoint import DenseCheckpoint
from .lora import LoraAdapter
from .recipes import DOWN

MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
#: Config fields every Branch-Train-MiX model must share with SRC (they fix the tensor layout and forward).
BTX_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
)


def mlp_key(layer: int, proj: int) -> str:
    return f"model.layers.{layer}.mlp.{MLP_PROJ[proj]}.weight"


class WeightSource:
    """Reads dense weights for the converter. Close it (context manager) to release file handles."""

    def __init__(self, base: DenseCheckpoint, experts_from: list[Path] = (), lora_experts: list[Path] = ()):
        self.base = base
        self.models: list[DenseCheckpoint] = []
        self.adapters: list[LoraAdapter] = []
        try:
            for path in experts_from:
                model = DenseCheckpoint(path)
                self.models.append(model)
                self._check_btx(model)
            shapes = {k: v.shape for k, v in base.tensors.items()}
            for path in lora_experts:
                adapter = LoraAdapter(path)
                self.adapters.append(adapter)
                adapter.check_against(shapes)
        except BaseException:
            self.close()
            raise

    def _check_btx(self, model: DenseCheckpoint) -> None:
        for name in BTX_FIELDS:
            if model.config.get(name) != self.base.config.get(name):
                raise CheckpointError(
                    f"--experts-from {model.folder}: config.json {name}={model.config.get(name)!r} differs from "
                    f"SRC's {self.base.config.get(name)!r}; Branch-Train-MiX needs fine-tunes of the same base."
                )
        a = {k: v.shape for k, v in model.tensors.items()}
        b = {k: v.shape for k, v in self.base.tensors.items()}
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise CheckpointError(
                f"--experts-from {model.folder}: tensors differ from SRC's (e.g. {diff}); it is not a fine-tune of SRC."
            )

    def close(self) -> None:
        for m in self.models:
            m.close()
        for a in self.adapters:
            a.close()
        self.base.close()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def copies(self) -> int | None:
        """Number of expert copies fixed by the sources (None: plain upcycling, the user chooses)."""
        return len(self.models) or len(self.adapters) or None

    @property
    def averaged(self) -> bool:
        return bool(self.models) or any(a.modules for a in self.adapters)

    def shared(self, key: str) -> torch.Tensor:
        """A non-expert tensor: as stored (plain), averaged over the fine-tunes, or base + mean adapter update."""
        if self.models:
            acc = None
            for m in self.models:
                t = m.read(key).float()
                acc = t if acc is None else acc.add_(t)
            return acc / len(self.models)
        if self.adapters:
            deltas = [d for a in self.adapters if (d := a.delta(key)) is not None]
            if deltas:
                return self.base.read(key).float() + torch.stack(deltas).sum(0) / len(self.adapters)
        return self.base.read(key)

    def ffn(self, layer: int, copy: int | None, proj: int, neurons: slice) -> torch.Tensor:
        """Neurons ``neurons`` of the dense FFN projection ``proj`` for expert copy ``copy``.

        As stored on disk when nothing is added (no copy or rounding), fp32 when a LoRA update is merged.
        """
        key = mlp_key(layer, proj)
        rows, cols = (None, neurons) if proj == DOWN else (neurons, None)
        if self.models and copy is not None:
            return self.models[copy].read(key, rows, cols)
        w = self.base.read(key, rows, cols)
        if self.adapters and copy is not None:
            d = self.adapters[copy].delta(key, rows, cols)
            if d is not None:
                w = w.float() + d
        return w

    def ffn_stats(self, layer: int, copy: int | None, proj: int, width: int) -> tuple[float, float]:
        """(mean, std) of one full dense projection, the statistics drop-upcycling samples from."""
        w = self.ffn(layer, copy, proj, slice(0, width)).float()
        return float(w.mean()), float(w.std())
