"""Experts stored as 3-D parameters on one module (transformers 5 layout).

- ``ExpertsInterfaceAdapter``: classes decorated with ``@use_experts_implementation`` (64 families in
  transformers 5.23). We register ``"moe_patch"`` in transformers' own experts registry and select it
  on the module's config: no transformers class is modified.
- ``PlainFusedAdapter``: same call signature and layout without the decorator (e.g. step3p7).
- ``ZeroExpertsAdapter``: LongCat-Flash, whose router may pick identity "zero computation" experts.
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.core import dispatch_combine, plan_dispatch
from ..dispatch.experts import bank_expert, fused_bank, moe_patch_experts_forward
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .base import Adapter, PatchOptions, Undo, bind_forward, chain, param_3d, set_attrs

if TYPE_CHECKING:
    from ..detect.finder import BlockHandle

IMPLEMENTATION_NAME = "moe_patch"


def register_experts_implementation() -> None:
    """Add ``"moe_patch"`` to transformers' experts registry (idempotent; the registry is the
    explicit extension point transformers provides for third parties)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, moe_patch_experts_forward)


def is_decorated(experts: torch.nn.Module) -> bool:
    """Instances of classes decorated by ``use_experts_implementation`` carry these flags and a config."""
    return all(hasattr(experts, a) for a in ("has_gate", "is_transposed", "_apply_gate", "config")) and (
        param_3d(experts, "down_proj") is not None
    )


def _fused_sizes(experts: torch.nn.Module, transposed: bool) -> tuple[int, int]:
    down = experts.down_proj
    return (down.shape[2], down.shape[1]) if transposed else (down.shape[1], down.shape[2])


def _fused_layout(experts: torch.nn.Module, transposed: bool, gated: bool, bias: bool, post_norm: bool,
                  interleaved: bool) -> ExpertLayout:
    first = "gate_up_proj" if gated else "up_proj"
    names = [first] + ([first + "_bias"] if bias else []) + ["down_proj"] + (["down_proj_bias"] if bias else [])
    return ExpertLayout(storage="fused", gated=gated, transposed=transposed, interleaved=interleaved, bias=bias,
                        post_norm=post_norm, param_names=tuple(names))


class ExpertsInterfaceAdapter(Adapter):
    name = "experts_interface"

    def match(self, block, name, experts) -> bool:
        return is_decorated(experts)

    def layout(self, experts) -> ExpertLayout:
        return _fused_layout(experts, bool(experts.is_transposed), bool(experts.has_gate), bool(experts.has_bias),
                             bool(experts.has_post_expert_norm), not getattr(experts, "is_concatenated", True))

    def sizes(self, experts) -> tuple[int, int]:
        return _fused_sizes(experts, bool(experts.is_transposed))

    def install(self, handle: BlockHandle, options: PatchOptions) -> Undo:
        register_experts_implementation()
        experts = handle.experts
        # The experts get a config of their own selecting "moe_patch": models (and other layers) that
        # share the original config object keep their implementation, and undo is order-independent.
        own = copy.copy(experts.config)
        own._experts_implementation_internal = IMPLEMENTATION_NAME
        return set_attrs(experts, config=own, **{NAME_ATTR: handle.info.experts_path,
                                                 VALIDATE_ATTR: options.validate})


def _has_routed_signature(experts: torch.nn.Module) -> bool:
    """forward(hidden_states, top_k_index, top_k_weights): the transformers 5 experts signature."""
    try:
        params = list(inspect.signature(type(experts).forward).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) >= 4


def _plain_transposed(experts: torch.nn.Module) -> bool | None:
    gu, down = experts.gate_up_proj, experts.down_proj
    if gu.shape[-1] == down.shape[-2] and gu.shape[-2] == 2 * down.shape[-1]:
        return False
    if gu.shape[-2] == down.shape[-1] and gu.shape[-1] == 2 * down.shape[-2]:
        return True
    return None


def _default_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return self.act_fn(gate) * up


class PlainFusedAdapter(Adapter):
    """Fused [gate; up] experts with the transformers 5 call signature but no decorator."""

    name = "fused_plain"

    def match(self, block, name, experts) -> bool:
        gu, down = param_3d(experts, "gate_up_proj"), param_3d(experts, "down_proj")
        return (
            gu is not None and down is not None and gu.shape[0] == down.shape[0] and not is_decorated(experts)
            and _has_routed_signature(experts) and _plain_transposed(experts) is not None
        )

    def num_experts(self, experts) -> int:
        return int(experts.down_proj.shape[0])

    def layout(self, experts) -> ExpertLayout:
        return _fused_layout(experts, bool(_plain_transposed(experts)), True, False, False, False)

    def sizes(self, experts) -> tuple[int, int]:
        return _fused_sizes(experts, bool(_plain_transposed(experts)))

    def install(self, handle: BlockHandle, options: PatchOptions) -> Undo:
        experts = handle.experts
        flags = dict(has_gate=True, is_transposed=bool(_plain_transposed(experts)), has_bias=False,
                     has_post_expert_norm=False, num_experts=self.num_experts(experts))
        flags[NAME_ATTR] = handle.info.experts_path
        flags[VALIDATE_ATTR] = options.validate
        undo_gate = (lambda: None)
        if not hasattr(experts, "_apply_gate"):
            undo_gate = set_attrs(experts, _apply_gate=_default_gate.__get__(experts))
        return chain(set_attrs(experts, **flags), undo_gate, bind_forward(experts, moe_patch_experts_forward))


def _zero_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """LongCat-Flash: expert ids >= num_routed_experts are identity experts."""
    total = self.num_routed_experts + self.zero_expert_num
    if top_k_index.numel() == 0:
        return torch.zeros_like(hidden_states)
    check_routing(self, top_k_index, top_k_weights)
    routed = self.num_routed_experts
    bank = fused_bank(self)

    def expert_fn(e: int, x: torch.Tensor) -> torch.Tensor:
        if e >= routed:
            return x
        return bank_expert(bank, e, x)

    plan = plan_dispatch(top_k_index, total)
    return dispatch_combine(hidden_states, top_k_index, top_k_weights, total, expert_fn, plan=plan)


class ZeroExpertsAdapter(Adapter):
    name = "zero_experts"

    def match(self, block, name, experts) -> bool:
        return (
            hasattr(experts, "zero_expert_num") and hasattr(experts, "num_routed_experts")
            and param_3d(experts, "down_proj") is not None and _has_routed_signature(experts)
        )

    def num_experts(self, experts) -> int:
        return int(experts.num_routed_experts)

    def layout(self, experts) -> ExpertLayout:
        return _fused_layout(experts, False, True, False, False, False)

    def sizes(self, experts) -> tuple[int, int]:
        return _fused_sizes(experts, False)

    def params_per_expert(self, experts) -> int:
        return (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())

    def install(self, handle: BlockHandle, options: PatchOptions) -> Undo:
        experts = handle.experts
        attrs = {"has_gate": True, "is_transposed": False, "has_bias": False, "has_post_expert_norm": False,
                 "num_experts": experts.num_routed_experts + experts.zero_expert_num,
                 NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate}
        if not hasattr(experts, "_apply_gate"):
            attrs["_apply_gate"] = _default_gate.__get__(experts)
        return chain(set_attrs(experts, **attrs), bind_forward(experts, _zero_experts_forward))
