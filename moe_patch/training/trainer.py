"""``MoETrainer``: transformers' Trainer with router and expert learning rates, an optional router z-loss, and
router losses that weigh the same under any number of processes and accumulation steps.

Everything else is the stock Trainer (its optimizer choice, weight-decay rule, scheduler, logging,
checkpointing, distributed setup); the two overrides are the ones its docstring invites subclasses to make.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..detect.structure import model_root
from ..errors import MoEConfigError
from .losses import router_z_loss, weigh_router_losses
from .roles import parameter_roles, regroup_optimizer


class MoETrainer(Trainer):
    """A ``transformers.Trainer`` for MoE models.

    Args:
        router_lr / expert_lr: learning rates of the routers and of the routed experts (None: the Trainer's
            ``learning_rate``); the Trainer's own optimizer groups are split by role before training, so the
            scheduler scales every group alike.
        router_z_loss_coef: weight of the ST-MoE router z-loss added to the training loss (0: off). Needs
            the router logits in the model's outputs (``config.output_router_logits``, which
            :func:`~moe_patch.training.enable_router_aux_loss` switches on).
        *args, **kwargs: as for ``transformers.Trainer``.

    The model's load-balancing term and the z-loss are means over a micro-batch; the stock Trainer scales the
    model's whole loss by the number of processes (and leaves it undivided by the accumulation steps), which is
    right for the cross-entropy but counts the auxiliary term N times (or once per micro-batch). Here each router
    term is averaged over processes and micro-batches (:func:`~moe_patch.training.weigh_router_losses`), so it
    weighs what it weighs in one process over one batch. (Over one batch of 8 the load-balancing loss is computed
    on all 8 sequences; over 2 processes of 4 it is the mean of two values computed on 4 each: a batch statistic,
    not a weight, and the same as with 2 accumulated micro-batches of 4.)
    """

    def __init__(
        self,
        *args: Any,
        router_lr: float | None = None,
        expert_lr: float | None = None,
        router_z_loss_coef: float = 0.0,
        **kwargs: Any,
    ):
        if (
            not isinstance(router_z_loss_coef, (int, float))
            or isinstance(router_z_loss_coef, bool)
            or router_z_loss_coef < 0
        ):
            raise MoEConfigError(f"router_z_loss_coef must be a number >= 0, got {router_z_loss_coef!r}")
        given = kwargs.get("optimizers", (None, None))
        if (router_lr is not None or expert_lr is not None) and given and given[0] is not None:
            raise MoEConfigError(
                "router_lr / expert_lr split the Trainer's own optimizer; with optimizers=(...) "
                "build its groups with moe_patch.training.param_groups(model, lr, router_lr=...)"
            )
        super().__init__(*args, **kwargs)
        self.router_lr, self.expert_lr = router_lr, expert_lr
        self.router_z_loss_coef = float(router_z_loss_coef)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and (self.router_lr is not None or self.expert_lr is not None):
            regroup_optimizer(
                optimizer,
                parameter_roles(self.model if model is None else model),
                router_lr=self.router_lr,
                expert_lr=self.expert_lr,
            )
        return optimizer

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels_reach_model = self.label_smoother is None and self.compute_loss_func is None and "labels" in inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        # The model adds coef * aux to its loss, then the Trainer multiplies that loss by the number of processes
        # (its DDP-averaging undo for a loss normalised by the tokens of every process) and, when the loss is
        # normalised over the accumulated batch, leaves it undivided by the accumulation steps. Right for the
        # cross-entropy; the auxiliary term is a per-batch mean, so it must be averaged over processes and
        # micro-batches instead. Rebalance it, and add the z-loss with the same per-batch weight.
        aux_term = self._model_aux_term(model, outputs) if labels_reach_model else None
        z_term = None
        if self.router_z_loss_coef:
            logits = outputs.get("router_logits") if isinstance(outputs, dict) else None
            if not logits:
                raise MoEConfigError(
                    "router_z_loss_coef is set but the model returned no router_logits; switch them on with "
                    "moe_patch.training.enable_router_aux_loss(model) (config.output_router_logits = True)"
                )
            z_term = self.router_z_loss_coef * router_z_loss(logits).to(loss.device)
        if aux_term is not None or z_term is not None:
            loss = weigh_router_losses(
                loss,
                aux_term=aux_term,
                z_term=z_term,
                loss_scale=self._trainer_loss_scale(num_items_in_batch),
                batch_weight=1.0 / self._accumulation_divisor(num_items_in_batch),
            )
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Trainer.training_step's own rule (transformers 5.23), so the router terms are scaled like the loss.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def _accumulation_divisor(self, num_items_in_batch) -> int:
        """What the router terms are divided by here: the accumulation steps, unless training_step divides
        the whole loss by them itself."""
        return self.current_gradient_accumulation_steps if self._loss_scaled_for_ga(num_items_in_batch) else 1

    def _trainer_loss_scale(self, num_items_in_batch) -> float:
        # Trainer.compute_loss's own rule (transformers 5.23): the model's loss, aux term included, is
        # multiplied by this when the loss is averaged over the tokens of every process.
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            scale = self.accelerator.num_processes // self.get_tp_size()
            return float(scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return 1.0

    def _model_aux_term(self, model, outputs) -> torch.Tensor | None:
        """``router_aux_loss_coef * aux_loss`` as the model added it to its loss (None when it added none)."""
        aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if not isinstance(aux, torch.Tensor):
            return None
        coef = getattr(model_root(self.accelerator.unwrap_model(model)), "router_aux_loss_coef", None)
        return float(coef) * aux if coef else None
