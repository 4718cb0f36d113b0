"""``RoutingCallback``: the routing monitor's figures, logged through the Trainer's own ``log``.

Logging through ``trainer.log`` puts them in ``state.log_history`` and in front of every ``report_to``
integration (TensorBoard, W&B, MLflow...) with no code of ours; the callback therefore holds the trainer,
as TRL's logging callbacks do: ``trainer.add_callback(RoutingCallback(trainer))``.

Under ``torchrun`` / ``accelerate launch`` the counts of every process are summed before the figures are computed
(one ``all_reduce`` per log), so every process logs the same figures of the whole batch, as the Trainer logs its
loss; its integrations and console write them once, from the main process.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import MoEConfigError
from ..monitoring import RoutingMonitor, RoutingReport
from ..monitoring.plot import plot_routing
from ..monitoring.stats import LayerRouting
from ..patch import is_patched
from .distributed import sum_over_processes

logger = logging.getLogger(__name__)


class RoutingCallback(TrainerCallback):
    """Log routing figures (load balance, entropy, z-loss, drops, stability) every ``every`` steps.

    Args:
        trainer: the ``transformers.Trainer`` whose ``log`` the figures go through.
        every: log every N optimizer steps; None logs whenever the Trainer logs (``logging_steps``).
        per_layer: also log each layer's figures (``routing/layer3/load_cv``...), not just the aggregates
            (worst and mean over layers).
        stability_inputs: a batch (dict of tensors) to re-route at each logging step; its share of tokens
            whose top-1 expert changed since the previous logging step is logged as ``top1_changed``.
        prefix: prefix of the logged names.
        router_stats: compute entropy / z-loss / top-k probability from router logits.

    Counts are taken in training mode only (evaluation inside training is left out) and cover the optimizer
    steps since the previous log, summed over every process of a distributed run. ``history`` (one report per
    log, every process's counts) and :meth:`report` (the whole run) stay readable after training; ``plot(path)``
    draws them. ``monitor`` (a :class:`~moe_patch.monitoring.RoutingMonitor`) holds this process's own counts.
    """

    def __init__(
        self,
        trainer: Any,
        *,
        every: int | None = None,
        per_layer: bool = False,
        stability_inputs: dict[str, Any] | None = None,
        prefix: str = "routing/",
        router_stats: bool = True,
    ):
        if not (callable(getattr(trainer, "log", None)) and hasattr(trainer, "model")):
            raise MoEConfigError(
                "RoutingCallback(trainer): pass the Trainer it logs through, e.g. "
                "trainer.add_callback(RoutingCallback(trainer))"
            )
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise MoEConfigError(f"RoutingCallback(every={every!r}): give a number of steps >= 1, or None")
        self.trainer = trainer
        self.every, self.per_layer, self.prefix, self.router_stats = every, per_layer, prefix, router_stats
        self.stability_inputs = stability_inputs
        self.monitor: RoutingMonitor | None = None
        self.history: list[RoutingReport] = []

    # -- Trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = self.trainer.model if model is None else model
        if not is_patched(model) and state.is_world_process_zero:
            logger.warning(
                "RoutingCallback: %s is not patched by moe-patch; its routing is logged all the same, but call "
                "moe_patch.patch_model(model) before training for moe-patch's exact, faster dispatch",
                type(model).__name__,
            )
        if self.monitor is not None:
            self.monitor.close()
        self.monitor = RoutingMonitor(model, when="train", router_stats=self.router_stats)
        self.monitor.history = self.history  # one history across train() calls (resumed runs)

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.every == 0 if self.every else control.should_log
        if due and self.monitor is not None:
            should_log = control.should_log
            self._log(state.global_step)
            # trainer.log -> on_log clears should_log on this same control object; the Trainer's own log of
            # this step (loss, learning rate) still has to happen.
            control.should_log = should_log
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        if self.monitor.calls_since_snapshot:
            self._log(state.global_step)  # the steps since the last log
        self.monitor.close()

    # -- output ------------------------------------------------------------------------------
    def _log(self, step: int) -> None:
        if self.stability_inputs is not None:
            device = self.trainer.args.device
            self.monitor.check_stability(
                {k: v.to(device) if hasattr(v, "to") else v for k, v in self.stability_inputs.items()}
            )
        report = sum_over_processes(self.monitor.snapshot(step=step))  # every process calls this at each log
        self.history[-1] = report  # the monitor appended this process's window
        self.trainer.log(report.log_figures(self.prefix, per_layer=self.per_layer))

    def report(self) -> RoutingReport:
        """The whole run so far (every logged window, every process), with the last logged routing stability."""
        if not self.history:
            raise MoEConfigError("RoutingCallback.report: nothing recorded yet (train first)")
        layers = [LayerRouting(lr.counts, lr.top1_changed) for lr in self.history[0].layers]
        for window in self.history[1:]:
            for total, lr in zip(layers, window.layers):
                total.counts = total.counts + lr.counts
                if lr.top1_changed is not None:
                    total.top1_changed = lr.top1_changed
        last = self.history[-1]
        return RoutingReport(
            layers=layers, calls=sum(r.calls for r in self.history), step=last.step, skipped=last.skipped
        )

    def to_json(self, **kwargs) -> str:
        """:meth:`report` as JSON, with :attr:`history` under ``"history"``."""
        import json

        data = self.report().to_dict()
        data["history"] = [r.to_dict() for r in self.history]
        return json.dumps(data, indent=kwargs.pop("indent", 2), **kwargs)

    def summary(self) -> str:
        """A table of :meth:`report`."""
        return str(self.report())

    def plot(self, path: str | Path) -> Path:
        """PNG of the run: expert load per layer over the whole run, load balance per logged step."""
        return plot_routing(self.report(), self.history, Path(path))
