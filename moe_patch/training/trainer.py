"""``MoETrainer``: transformers' Trainer with router and expert learning rates and an optional router z-loss.

Everything else is the stock Trainer (its optimizer choice, weight-decay rule, scheduler, logging,
checkpointing, distributed setup); the two overrides are the ones its docstring invites subclasses to make.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..errors import MoEConfigError
from .losses import router_z_loss
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
    """

    def __init__(self, *args: Any, router_lr: float | None = None, expert_lr: float | None = None,
                 router_z_loss_coef: float = 0.0, **kwargs: Any):
        if not isinstance(router_z_loss_coef, (int, float)) or isinstance(router_z_loss_coef, bool) \
                or router_z_loss_coef < 0:
            raise MoEConfigError(f"router_z_loss_coef must be a number >= 0, got {router_z_loss_coef!r}")
        given = kwargs.get("optimizers", (None, None))
        if (router_lr is not None or expert_lr is not None) and given and given[0] is not None:
            raise MoEConfigError("router_lr / expert_lr split the Trainer's own optimizer; with optimizers=(...) "
                                 "build its groups with moe_patch.training.param_groups(model, lr, router_lr=...)")
        super().__init__(*args, **kwargs)
        self.router_lr, self.expert_lr = router_lr, expert_lr
        self.router_z_loss_coef = float(router_z_loss_coef)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh and (self.router_lr is not None or self.expert_lr is not None):
            regroup_optimizer(optimizer, parameter_roles(self.model if model is None else model),
                              router_lr=self.router_lr, expert_lr=self.expert_lr)
        return optimizer

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not self.router_z_loss_coef or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        logits = outputs.get("router_logits") if isinstance(outputs, dict) else None
        if not logits:
            raise MoEConfigError(
                "router_z_loss_coef is set but the model returned no router_logits; switch them on with "
                "moe_patch.training.enable_router_aux_loss(model) (config.output_router_logits = True)")
        z = router_z_loss(logits).to(loss.device)
        if self._loss_scaled_for_ga(num_items_in_batch):
            # training_step will not divide this loss by the accumulation steps: the per-batch z-loss must be.
            z = z / self.current_gradient_accumulation_steps
        loss = loss + self.router_z_loss_coef * z
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        # Trainer.training_step's own rule (transformers 5.23), so the z-loss is scaled like the loss it joins.
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)
