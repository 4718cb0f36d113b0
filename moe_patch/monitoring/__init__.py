"""Routing monitor, ``moe_patch.monitor(model)``: what every MoE layer's router does, counted on the
device, read back when asked.

    with moe_patch.monitor(model) as mon:
        model(**batch)
        mon.check_stability(probe)        # share of tokens whose top-1 expert moves between two checks
        model(**batch)
        mon.check_stability(probe)
    print(mon.summary())                  # a table per layer; mon.to_json(); mon.plot("routing.png")

Per layer: tokens per expert, load balance (coefficient of variation, max/mean, share of idle
experts), top-k weight mass, router entropy, z-loss and top-k probability where the router logits are
visible, non-finite router outputs, tokens dropped at capacity (Switch Transformers, NLLB-MoE) and
routing stability. Works on resident, patched, offloaded and peft-wrapped models: it only adds forward
hooks (``close()`` removes them). The figures are defined in :mod:`moe_patch.monitoring.stats`.

(The package is ``monitoring`` so that ``moe_patch.monitor`` stays the function.)
"""

from __future__ import annotations

from torch import nn

from .monitor import RoutingMonitor
from .stats import LayerCounts, LayerRouting, RoutingReport


def monitor(model: nn.Module, *, when: str = "always", router_stats: bool = True) -> RoutingMonitor:
    """Start counting the routing of ``model``'s MoE layers.

    Args:
        model: a transformers model (patched or not, offloaded by :func:`moe_patch.load_model`), a peft
            ``PeftModel``, or any module with MoE blocks that :func:`moe_patch.inspect_model` finds.
        when: which forward calls of the model count: ``"always"``, ``"train"`` (model in training mode:
            evaluation inside a training loop is left out) or ``"eval"``.
        router_stats: also compute entropy, z-loss, top-k probability and non-finite counts from the
            router logits (a few more reductions per layer).

    Counts are device tensors updated in place (no host sync per layer); :meth:`RoutingMonitor.report`,
    ``summary()``, ``to_json()`` and ``snapshot()`` read them back. Only calls of ``model`` itself
    (``model(...)``, ``generate``, a Trainer step) are counted, not direct calls of its submodules.

    Raises:
        NoMoEFoundError: the model has no MoE block whose routing hooks can see.
    """
    return RoutingMonitor(model, when=when, router_stats=router_stats)


__all__ = ["LayerCounts", "LayerRouting", "RoutingMonitor", "RoutingReport", "monitor"]
