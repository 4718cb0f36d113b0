"""``RoutingCallback``: the routing monitor's figures, logged through the Trainer's own ``log``.

Logging through ``trainer.log`` puts them in ``state.log_history`` and in front of every ``report_to``
integration (TensorBoard, W&B, MLflow...) with no code of ours; the callback therefore holds the trainer,
as TRL's logging callbacks do: ``trainer.add_callback(RoutingCallback(trainer))``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import MoEConfigError
from ..monitoring import RoutingMonitor, RoutingReport
from ..patch import is_patched

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
    steps since the previous log. ``monitor`` (a :class:`~moe_patch.monitoring.RoutingMonitor`) and
    ``history`` (one report per log) stay readable after training; ``plot(path)`` draws them.
    """

    def __init__(self, trainer: Any, *, every: int | None = None, per_layer: bool = False,
                 stability_inputs: dict[str, Any] | None = None, prefix: str = "routing/", router_stats: bool = True):
        if not (callable(getattr(trainer, "log", None)) and hasattr(trainer, "model")):
            raise MoEConfigError("RoutingCallback(trainer): pass the Trainer it logs through, e.g. "
                                 "trainer.add_callback(RoutingCallback(trainer))")
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
        if not is_patched(model):
            logger.warning(
                "RoutingCallback: %s is not patched by moe-patch; its routing is logged all the same, but call "
                "moe_patch.patch_model(model) before training for moe-patch's exact, faster dispatch",
                type(model).__name__)
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
            self.monitor.check_stability({k: v.to(device) if hasattr(v, "to") else v
                                          for k, v in self.stability_inputs.items()})
        report = self.monitor.snapshot(step=step)
        self.trainer.log(report.log_figures(self.prefix, per_layer=self.per_layer))

    def plot(self, path: str | Path) -> Path:
        """PNG of the run: expert load per layer over the whole run, load balance per logged step."""
        if self.monitor is None:
            raise MoEConfigError("RoutingCallback.plot: nothing recorded yet (train first)")
        return self.monitor.plot(path)
