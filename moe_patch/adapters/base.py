"""What an adapter is: how moe-patch recognises one kind of experts container and drives it.

Adapters are the only code that knows a family's quirks. Each one answers, for a (block, experts)
pair found while walking a model: is this mine (`match`), how are the weights laid out (`layout`,
sizes), and how to install / remove the fast dispatch (`install` returns the undo).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout

if TYPE_CHECKING:
    from ..detect.finder import BlockHandle

Undo = Callable[[], None]


@dataclass
class PatchOptions:
    """Options of :func:`moe_patch.patch_model` that adapters see.

    Attributes:
        validate: check router output (finite weights, indices in range) before every dispatch;
            costs one host sync per block. Turn off for speed once a model is known good.
    """

    validate: bool = True


class Adapter:
    """Base class; subclasses override what differs. Stateless: per-block state lives on the handle."""

    name: str = "adapter"
    #: Set by adapters whose routing is not read from a router (e.g. one expert per image).
    fixed_top_k: int | None = None
    routing_kind: str | None = None

    def match(self, block: torch.nn.Module, name: str, experts: torch.nn.Module) -> bool:
        raise NotImplementedError

    def num_experts(self, experts: torch.nn.Module) -> int:
        return int(experts.num_experts)

    def layout(self, experts: torch.nn.Module) -> ExpertLayout:
        raise NotImplementedError

    def sizes(self, experts: torch.nn.Module) -> tuple[int, int]:
        """(hidden_size, intermediate_size) of one expert."""
        raise NotImplementedError

    def params_per_expert(self, experts: torch.nn.Module) -> int:
        e = self.num_experts(experts)
        return sum(p.numel() for p in experts.parameters()) // max(e, 1)

    def install(self, handle: BlockHandle, options: PatchOptions) -> Undo:
        raise NotImplementedError


def bind_forward(module: torch.nn.Module, fn: Callable) -> Undo:
    """Give one module instance a new forward (its class and every other instance keep theirs)."""
    module.forward = types.MethodType(fn, module)

    def undo() -> None:
        module.__dict__.pop("forward", None)

    return undo


def set_attrs(module: torch.nn.Module, **attrs) -> Undo:
    """Set instance attributes, remembering what was there to restore it exactly."""
    missing = object()
    saved = {k: module.__dict__.get(k, missing) for k in attrs}
    for k, v in attrs.items():
        object.__setattr__(module, k, v)

    def undo() -> None:
        for k, v in saved.items():
            if v is missing:
                module.__dict__.pop(k, None)
            else:
                object.__setattr__(module, k, v)

    return undo


def chain(*undos: Undo) -> Undo:
    def undo() -> None:
        for u in reversed(undos):
            u()

    return undo


def param_3d(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    p = module._parameters.get(name) if isinstance(module, torch.nn.Module) else None
    return p if p is not None and p.dim() == 3 else None
