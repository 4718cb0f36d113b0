"""Continued training of MoE models (upcycled ones first) with transformers' Trainer.

    from moe_patch.training import MoETrainer, RoutingCallback, enable_router_aux_loss

    moe_patch.patch_model(model)                      # exact gradients, faster dispatch
    enable_router_aux_loss(model, 0.01)               # the model's own load-balancing loss
    trainer = MoETrainer(model=model, args=args, train_dataset=data, router_lr=1e-3, router_z_loss_coef=1e-3)
    trainer.add_callback(RoutingCallback(trainer))    # routing figures through trainer.log -> any report_to
    trainer.train()

- :class:`MoETrainer`: router / expert learning rates (the Trainer's own optimizer groups split by role)
  and the ST-MoE router z-loss.
- :class:`RoutingCallback`: :func:`moe_patch.monitor` figures logged every N steps.
- :func:`expert_lora_config`: peft LoRA on the routed experts (``target_parameters`` for fused experts).
- :mod:`~moe_patch.training.data`: local text -> byte-level BPE -> token blocks (nothing downloaded).
- Under ``torchrun`` / ``accelerate launch`` the router losses keep their one-process weight
  (:func:`weigh_router_losses`) and routing counts are summed over processes (:func:`sum_over_processes`);
  docs/scale-out.md.

Needs ``accelerate`` (transformers' Trainer does): ``pip install moe-patch[train]``.
"""

from __future__ import annotations

import importlib

# Lazy: importing the package must not import transformers' Trainer (and accelerate) until one is used.
_EXPORTS = {
    "MoETrainer": "trainer",
    "RoutingCallback": "callback",
    "enable_router_aux_loss": "losses",
    "router_z_loss": "losses",
    "weigh_router_losses": "losses",
    "sum_over_processes": "distributed",
    "param_groups": "roles",
    "parameter_roles": "roles",
    "split_by_role": "roles",
    "expert_lora_config": "lora",
    "expert_lora_targets": "lora",
    "TokenBlocks": "data",
    "python_stdlib_files": "data",
    "split_held_out": "data",
    "text_files": "data",
    "train_byte_bpe": "data",
    "held_out_loss": "evaluate",
    "small_dense_llama": "models",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
