"""The routing monitor handle: attach, count on the device, read back when asked, detach."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..detect.structure import model_root
from ..errors import MoEConfigError, NoMoEFoundError
from .blocks import moe_blocks
from .counters import read_changed, read_counts
from .hooks import HookState, check_when, install, plan_taps
from .stats import LayerCounts, LayerRouting, RoutingReport

logger = logging.getLogger(__name__)


class RoutingMonitor:
    """Counts the routing of every MoE layer of a model; see :func:`moe_patch.monitor`.

    Attributes:
        model: the monitored model.
        history: the windows :meth:`snapshot` returned, in order (a training run's per-step figures).
    """

    def __init__(self, model: nn.Module, *, when: str = "always", router_stats: bool = True):
        root = model_root(model)
        handles = moe_blocks(model)
        if not handles:
            raise NoMoEFoundError(
                f"{type(root).__name__}: no Mixture-of-Experts block found, so there is no routing to monitor "
                "(moe_patch.inspect_model(model) shows what detection sees)"
            )
        taps, skipped = plan_taps(model, handles)
        if not taps:
            raise NoMoEFoundError(
                f"{type(root).__name__}: none of its {len(handles)} MoE blocks shows its routing to hooks: "
                f"{next(iter(skipped.values()))}"
            )
        for path, why in skipped.items():
            logger.warning("routing monitor: not watching %s: %s", path, why)
        self.model = model
        self._state = HookState(when=check_when(when), router_stats=router_stats)
        self._taps = install(model, taps, skipped, self._state)
        self._counters = [t.counter for t in taps]
        self._past: list[LayerCounts] = [c.empty_counts() for c in self._counters]
        self._calls_at_snapshot = 0
        self._probe_inputs: dict[str, torch.Tensor] | None = None
        self._previous_top1: list[torch.Tensor | None] | None = None
        self.history: list[RoutingReport] = []

    # -- what is watched ---------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Experts module paths of the monitored layers, in order."""
        return [c.path for c in self._counters]

    @property
    def calls_since_snapshot(self) -> int:
        """Counted forward calls not yet in a :meth:`snapshot`."""
        return self._state.calls - self._calls_at_snapshot

    @property
    def skipped(self) -> dict[str, str]:
        """Experts module path -> why that block is not (or no longer) monitored."""
        out = dict(self._taps.skipped)
        out.update({t.counter.path: f"stopped: {t.failed}" for t in self._taps.taps if t.failed})
        return out

    # -- read back (the only host syncs) -----------------------------------------------------
    def report(self) -> RoutingReport:
        """Everything counted since the monitor started (or :meth:`reset`): one transfer per device."""
        now = read_counts(self._counters)
        return self._report([p + n for p, n in zip(self._past, now)], self._state.calls, None)

    def snapshot(self, step: int | None = None) -> RoutingReport:
        """The window since the previous snapshot; it is appended to :attr:`history`, then zeroed
        (:meth:`report` still includes it)."""
        window = read_counts(self._counters)
        rep = self._report(window, self._state.calls - self._calls_at_snapshot, step)
        self._past = [p + w for p, w in zip(self._past, window)]
        for c in self._counters:
            c.zero_()
        self._calls_at_snapshot = self._state.calls
        self.history.append(rep)
        return rep

    def _report(self, counts: list[LayerCounts], calls: int, step: int | None) -> RoutingReport:
        changed = read_changed(self._counters)
        return RoutingReport(
            layers=[LayerRouting(c, ch) for c, ch in zip(counts, changed)], calls=calls, step=step, skipped=self.skipped
        )

    def reset(self) -> None:
        """Zero every count, the history and the stability reference."""
        for c in self._counters:
            c.zero_()
            c.top1 = c.changed = None
        self._past = [c.empty_counts() for c in self._counters]
        self._state.calls = self._calls_at_snapshot = 0
        self._probe_inputs = self._previous_top1 = None
        self.history.clear()

    def summary(self) -> str:
        """A table of :meth:`report`."""
        return str(self.report())

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`report` as JSON, with :attr:`history` under ``"history"``."""
        import json

        data = self.report().to_dict()
        data["history"] = [r.to_dict() for r in self.history]
        return json.dumps(data, indent=kwargs.pop("indent", 2), **kwargs)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG: expert load per layer (heatmap) and, after two or more snapshots, the load balance
        per step. Needs matplotlib (``pip install matplotlib``)."""
        from .plot import plot_routing

        return plot_routing(self.report(), self.history, Path(path))

    # -- stability ---------------------------------------------------------------------------
    def check_stability(self, inputs: dict[str, Any] | torch.Tensor) -> None:
        """Run the model on ``inputs`` (eval mode, no grad, not counted) and record, per layer, the share of
        tokens whose top-1 expert changed since the previous check on the same inputs (``top1_changed`` in
        the report). The first check sets the reference. Compares the inputs with the previous check's
        (one host sync)."""
        inputs = {"input_ids": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if self._probe_inputs is not None and not _same_inputs(self._probe_inputs, tensors):
            raise MoEConfigError(
                "check_stability: these inputs differ from the previous check's; stability compares routing "
                "on the same inputs (reset() starts over with new ones)"
            )
        modes = {m: m.training for m in self.model.modules()}
        for c in self._counters:
            c.top1 = None
        self._state.probing = True
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(**inputs)
        finally:
            self._state.probing = False
            for m, training in modes.items():
                m.training = training
        previous = self._previous_top1 or [None] * len(self._counters)
        for c, prev in zip(self._counters, previous):
            c.compare_top1(prev)
        self._previous_top1 = [c.top1 for c in self._counters]
        self._probe_inputs = {k: v.detach().clone() for k, v in tensors.items()}

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook (idempotent); the counts stay readable."""
        self._taps.remove()

    def __enter__(self) -> RoutingMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RoutingMonitor({type(model_root(self.model)).__name__}, {len(self._counters)} layers)"


def _same_inputs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)) for k in a)
