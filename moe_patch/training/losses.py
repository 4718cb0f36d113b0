"""Router losses for continued MoE training: the model's own auxiliary loss, and the ST-MoE z-loss.

The load-balancing auxiliary loss is transformers' own (``load_balancing_loss_func``, added to the
model's loss when ``output_router_logits`` is on); :func:`enable_router_aux_loss` switches it on and
checks the model has it. The router z-loss (Zoph et al. 2022, "ST-MoE", eq. 5) penalises large router
logits; no transformers causal LM computes it, so :func:`router_z_loss` does, from the router logits the
model returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from ..detect.structure import model_root
from ..errors import MoEConfigError

logger = logging.getLogger(__name__)


def router_z_loss(router_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of ``logsumexp(logits) ** 2``, averaged over layers (ST-MoE's router z-loss).

    ``router_logits`` is one ``[..., num_experts]`` tensor or the per-layer tuple a transformers MoE model
    returns as ``outputs.router_logits``; layers may sit on different devices (the result is on the first's).
    """
    layers = [router_logits] if isinstance(router_logits, torch.Tensor) else [t for t in router_logits if t is not None]
    if not layers:
        raise MoEConfigError("router_z_loss: no router logits given")
    device = layers[0].device
    per_layer = [torch.logsumexp(t.float(), dim=-1).square().mean().to(device) for t in layers]
    return torch.stack(per_layer).mean()


def weigh_router_losses(
    loss: torch.Tensor,
    *,
    aux_term: torch.Tensor | None = None,
    z_term: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    batch_weight: float = 1.0,
) -> torch.Tensor:
    """Give the router losses the weight they have in one process over one batch.

    ``loss`` is a process's micro-batch loss as a data-parallel trainer builds it: the model's loss (cross-entropy
    normalised by the tokens of the whole accumulated, all-process batch, plus ``aux_term``, the load-balancing
    term the model added) multiplied by ``loss_scale`` (the number of processes, which undoes DDP's / FSDP's
    gradient averaging for the cross-entropy). The router terms are means over this micro-batch, so each must
    weigh ``batch_weight`` (1 / accumulation steps) instead: averaged over processes by the gradient reduction
    and summed over micro-batches, they then weigh what they weigh in one process. Returns
    ``loss + (batch_weight - loss_scale) * aux_term + batch_weight * z_term``.
    """
    if aux_term is not None:
        loss = loss + (batch_weight - loss_scale) * aux_term.to(loss.device)
    if z_term is not None:
        loss = loss + batch_weight * z_term.to(loss.device)
    return loss


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [config] + ([text] if text is not config else [])


def enable_router_aux_loss(model: nn.Module, coef: float | None = None) -> float | None:
    """Switch on the model's own router load-balancing loss for training.

    Sets ``config.output_router_logits = True`` and, when ``coef`` is given, ``router_aux_loss_coef`` on the
    config and on the modules that copied it at construction (transformers' causal LMs read it from
    ``self.router_aux_loss_coef``). Returns the coefficient in force, or None, with a one-line warning,
    when the model's config has no router-loss fields (its class computes no auxiliary loss).

    Raises:
        MoEConfigError: ``coef`` is negative or not a number.
    """
    if coef is not None and (not isinstance(coef, (int, float)) or isinstance(coef, bool) or coef < 0):
        raise MoEConfigError(f"router_aux_loss_coef must be a number >= 0, got {coef!r}")
    root = model_root(model)
    configs = [c for c in _configs(root) if hasattr(c, "output_router_logits")]
    holders = [
        m
        for m in root.modules()
        if hasattr(m, "router_aux_loss_coef") and not isinstance(m.router_aux_loss_coef, nn.Module)
    ]
    if not configs or not holders:
        logger.warning(
            "%s: its config has no output_router_logits / router_aux_loss_coef, so this model computes no router "
            "load-balancing loss; training continues without it (use a router z-loss, or a target such as "
            "Mixtral, Qwen2-MoE, Qwen3-MoE or FlexOlmo, which have one)",
            type(root).__name__,
        )
        return None
    for c in configs:
        c.output_router_logits = True
        if coef is not None:
            c.router_aux_loss_coef = float(coef)
    if coef is not None:
        for m in holders:
            m.router_aux_loss_coef = float(coef)
    return float(holders[0].router_aux_loss_coef)
