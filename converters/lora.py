"""LoRA adapters (peft format, safetensors only) as the source of one expert each.

An adapter's update ``scaling * B @ A`` on the FFN projections makes that expert's FFN; updates on
other modules (attention) cannot be per-expert, so the converter averages them over the adapters.
Adapters are checked against the base model's tensor shapes, so an adapter trained for another base
is refused by name.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from moe_patch.errors import CheckpointError, MoEConfigError

from .recipes import lora_delta

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoraAdapter:
    """One peft LoRA adapter folder, opened lazily."""

    def __init__(self, folder: str | Path):
        from peft import LoraConfig
        from safetensors import safe_open

        self.folder = Path(folder)
        cfg_path = self.folder / "adapter_config.json"
        weights = self.folder / ADAPTER_WEIGHTS
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{self.folder}: no adapter_config.json; --lora-experts takes peft LoRA adapter folders."
            )
        if not weights.is_file():
            extra = (
                " (adapter_model.bin is pickle and is not read; re-save with safe_serialization)"
                if (self.folder / "adapter_model.bin").exists()
                else ""
            )
            raise CheckpointError(f"{weights}: missing{extra}.")
        try:
            self.config = LoraConfig.from_pretrained(str(self.folder))
        except Exception as exc:
            raise MoEConfigError(f"{cfg_path}: not a peft LoRA config ({type(exc).__name__}: {exc}).") from None
        c = self.config
        unsupported = {
            "use_dora": bool(getattr(c, "use_dora", False)),
            "fan_in_fan_out": bool(getattr(c, "fan_in_fan_out", False)),
            "alpha_pattern": bool(getattr(c, "alpha_pattern", None)),
            "modules_to_save": bool(getattr(c, "modules_to_save", None)),
            "lora_bias": bool(getattr(c, "lora_bias", False)),
            "bias": getattr(c, "bias", "none") != "none",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise MoEConfigError(
                f"{cfg_path}: {', '.join(bad)} set; only plain LoRA (A, B, lora_alpha, optional rslora) can be "
                "merged into an expert exactly."
            )
        self._stack = ExitStack()
        try:
            self._f = self._stack.enter_context(safe_open(weights, framework="pt"))
        except Exception as exc:
            raise CheckpointError(f"{weights}: unreadable safetensors file ({exc}).") from None
        self.keys = set(self._f.keys())
        self.modules = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in self.keys if ".lora_" in k})

    def close(self) -> None:
        self._stack.close()

    def _scaling(self, rank: int) -> float:
        alpha = float(self.config.lora_alpha)
        return alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank

    def check_against(self, base_shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse an adapter whose modules or shapes do not belong to this base model."""
        for module in self.modules:
            key = f"{module}.weight"
            if key not in base_shapes:
                raise CheckpointError(
                    f"{self.folder}: adapter targets {module}, which the base model does not have; "
                    "this adapter was trained for another base model."
                )
            a, b = self._pair(module)
            out_f, in_f = base_shapes[key]
            if a.get_shape()[1] != in_f or b.get_shape()[0] != out_f:
                raise CheckpointError(
                    f"{self.folder}: adapter for {module} has shapes A{a.get_shape()} B{b.get_shape()}, the base "
                    f"weight is [{out_f}, {in_f}]; this adapter was trained for another base model."
                )

    def _pair(self, module: str) -> tuple[Any, Any]:
        ka, kb = f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"
        if ka not in self.keys or kb not in self.keys:
            raise CheckpointError(f"{self.folder}: adapter has only one of lora_A/lora_B for {module}.")
        return self._f.get_slice(ka), self._f.get_slice(kb)

    def delta(self, weight_key: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor | None:
        """fp32 update for ``weight_key`` (or a row/column block of it), or None if the adapter leaves it alone."""
        module = weight_key.removesuffix(".weight")
        if module not in self.modules:
            return None
        a, b = self._pair(module)
        rank = a.get_shape()[0]
        a_t = a[:, cols] if cols is not None else a[:]
        b_t = b[rows] if rows is not None else b[:]
        return lora_delta(a_t, b_t, self._scaling(rank))
