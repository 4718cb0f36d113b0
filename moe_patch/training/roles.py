"""Optimizer parameter groups by role: routers, routed experts, everything else.

An upcycled MoE starts with copies of one FFN and an untrained router; a higher router learning rate lets
routing specialise early, a lower expert one keeps the copies close to the dense model they came from.
Roles come from detection (``find_moe_blocks``), so names and families do not matter.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..detect.structure import model_root
from ..errors import MoEConfigError
from ..families import find_moe_blocks
from ..monitoring.blocks import resolve_block

ROLES = ("other", "router", "experts")


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> "router" | "experts"`` for every parameter of a router or of a routed experts
    container (peft LoRA factors on them included); parameters not listed are ``"other"``."""
    root = model_root(model)
    roles: dict[int, str] = {}
    for handle in find_moe_blocks(model):
        real = resolve_block(root, handle)
        for p in real.experts.parameters():
            roles[id(p)] = "experts"
        if real.router is not None:
            for p in real.router.parameters():
                roles[id(p)] = "router"
    return roles


def split_by_role(
    groups: Iterable[dict[str, Any]],
    roles: dict[int, str],
    *,
    router_lr: float | None = None,
    expert_lr: float | None = None,
) -> list[dict[str, Any]]:
    """Each optimizer group split into its ``other`` / ``router`` / ``experts`` parameters. ``other`` keeps
    the group's learning rate, routers and experts get ``router_lr`` / ``expert_lr`` (the group's when None);
    every other setting (weight decay, betas...) is kept and empty groups are dropped. ``other`` groups come
    first, so the "first group" learning rate a scheduler or logger reports is the main one. Each group gets
    a ``"role"`` key."""
    for name, value in (("router_lr", router_lr), ("expert_lr", expert_lr)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise MoEConfigError(f"{name} must be a number >= 0, got {value!r}")
    out: dict[str, list[dict[str, Any]]] = {r: [] for r in ROLES}
    for group in groups:
        params = list(group["params"])
        rates = {
            "other": group["lr"],
            "router": group["lr"] if router_lr is None else router_lr,
            "experts": group["lr"] if expert_lr is None else expert_lr,
        }
        for role in ROLES:
            mine = [p for p in params if roles.get(id(p), "other") == role]
            if mine:
                out[role].append({**group, "params": mine, "lr": rates[role], "role": role})
    return [g for role in ROLES for g in out[role]]


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    router_lr: float | None = None,
    expert_lr: float | None = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups of ``model``'s trainable parameters for any torch optimizer, e.g.
    ``torch.optim.AdamW(param_groups(model, 1e-4, router_lr=1e-3))``. (:class:`MoETrainer` splits the
    Trainer's own groups instead, keeping its weight-decay rule.)"""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise MoEConfigError(f"{type(model).__name__} has no trainable parameter")
    return split_by_role(
        [{"params": trainable, "lr": lr, "weight_decay": weight_decay}],
        parameter_roles(model),
        router_lr=router_lr,
        expert_lr=expert_lr,
    )


def regroup_optimizer(
    optimizer: torch.optim.Optimizer, roles: dict[int, str], *, router_lr: float | None, expert_lr: float | None
) -> None:
    """Split an optimizer's groups by role in place, before its first step (no state to carry over) and
    before a scheduler records the groups' initial learning rates."""
    if optimizer.state:
        raise MoEConfigError("regroup_optimizer: the optimizer has already stepped; split its groups before training")
    groups = [{k: v for k, v in g.items() if k != "initial_lr"} for g in optimizer.param_groups]
    optimizer.param_groups.clear()
    for g in split_by_role(groups, roles, router_lr=router_lr, expert_lr=expert_lr):
        optimizer.add_param_group(g)
