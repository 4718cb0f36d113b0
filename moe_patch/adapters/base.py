"""What an adapter is: how moe-patch recognises one kind of experts container and drives it.

Adapters are the only code that knows a family's quirks. Each one answers, for a (block, experts)
pair found while walking a model: is this mine (`match`), how are the weights laid out (`layout`,
sizes), and how to install the fast dispatch (`install`, through `set_attrs` / `bind_forward`, which
record on each module what they changed so `restore` puts it back).
"""

from __future__ import annotations

import enum
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout

if TYPE_CHECKING:
    from ..detect.finder import BlockHandle

#: The one attribute moe-patch adds to each module it changes: what every attribute it set held before.
#: The record lives on the module itself, so unpatching restores exactly and a ``copy.deepcopy`` of the
#: model carries records about its own modules (a list of undo closures would point at the original's).
SAVED_ATTR = "_moe_patch_saved"
#: Prefix of what the dispatch caches on a patched module (derived from its weights; dropped on unpatch).
CACHE_PREFIX = "_moe_patch_cache_"


class _Absent(enum.Enum):
    """Marks an attribute the module did not have (an enum member stays itself through copy and pickle)."""

    ABSENT = "absent"


ABSENT = _Absent.ABSENT


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

    def install(self, handle: BlockHandle, options: PatchOptions) -> str | None:
        """Install the dispatch on this block with :func:`set_attrs` / :func:`bind_forward` only (they
        record what :func:`restore` puts back). Returns None, or why the block was left as it was."""
        raise NotImplementedError


def set_attrs(module: torch.nn.Module, **attrs) -> None:
    """Set instance attributes, recording on the module what each held before (the first time only)."""
    saved = module.__dict__.get(SAVED_ATTR)
    if saved is None:
        saved = {}
        object.__setattr__(module, SAVED_ATTR, saved)
    for k, v in attrs.items():
        saved.setdefault(k, module.__dict__.get(k, ABSENT))
        object.__setattr__(module, k, v)


def bind_forward(module: torch.nn.Module, fn: Callable) -> None:
    """Give one module instance a new forward (its class and every other instance keep theirs). A bound
    method: ``copy.deepcopy`` rebinds it to the copy."""
    set_attrs(module, forward=types.MethodType(fn, module))


def restore(module: torch.nn.Module) -> bool:
    """Put back every attribute :func:`set_attrs` changed on ``module`` and drop the dispatch's caches
    (``_moe_patch_cache_*``); False if it changed nothing."""
    for key in [k for k in module.__dict__ if k.startswith(CACHE_PREFIX)]:
        del module.__dict__[key]
    saved = module.__dict__.pop(SAVED_ATTR, None)
    if saved is None:
        return False
    for k, v in saved.items():
        if v is ABSENT:
            module.__dict__.pop(k, None)
        else:
            object.__setattr__(module, k, v)
    return True


def changed_modules(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules under ``root`` that carry a moe-patch record."""
    return (m for m in root.modules() if SAVED_ATTR in m.__dict__)


def param_3d(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    p = module._parameters.get(name) if isinstance(module, torch.nn.Module) else None
    return p if p is not None and p.dim() == 3 else None
