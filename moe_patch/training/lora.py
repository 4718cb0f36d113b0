"""LoRA on the routed experts with peft, whatever their layout.

transformers 5 fuses each MoE layer's experts into 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) that are not ``nn.Linear`` modules, so peft's ``target_modules`` cannot reach
them. peft (>= 0.17) has ``target_parameters`` for exactly this: its ``ParamWrapper`` gives each expert
its own rank-r factors and adds the update to the parameter while the experts run (a parametrisation),
so moe-patch's dispatch, which reads the experts' parameters at call time, trains them exactly. Its
limits (peft 0.21): no LoRA dropout, no DoRA, no bias on these wrappers. Experts stored as a ModuleList of
MLPs are ordinary ``nn.Linear`` modules and go through ``target_modules``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..detect.structure import model_root
from ..errors import MoEConfigError, NoMoEFoundError
from ..families import find_moe_blocks

#: Attention projection names across the families moe-patch upcycles and most others.
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def expert_lora_targets(
    model: nn.Module, *, attention: bool = False, shared_experts: bool = False
) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) that put LoRA on every routed expert of ``model``, and on the
    attention projections / shared experts when asked.

    Raises:
        MoEConfigError: a block's experts have a layout peft cannot adapt per expert (DBRX's 2-D stacked
            matrices: LoRA would span all experts at once); the message offers attention / shared experts.
    """
    root = model_root(model)
    handles = find_moe_blocks(model)
    if not handles:
        raise NoMoEFoundError(f"{type(root).__name__}: no Mixture-of-Experts block found for expert LoRA")
    modules: list[str] = []
    parameters: list[str] = []
    for h in handles:
        targets = h.family.lora_targets(h)
        if targets is None:
            raise MoEConfigError(
                f"{h.info.experts_path}: experts stored as {h.info.layout.flags()} cannot get per-expert LoRA from "
                "peft; put LoRA on the attention and shared experts instead (attention=True, shared_experts=True)"
            )
        modules += targets[0]
        parameters += targets[1]
        if shared_experts:
            for path in h.info.shared_paths:
                shared = root.get_submodule(path)
                modules += [f"{path}.{n}" if n else path for n, m in shared.named_modules() if isinstance(m, nn.Linear)]
    if attention:
        present = {name.rpartition(".")[2] for name, m in root.named_modules() if isinstance(m, nn.Linear)}
        modules += [n for n in ATTENTION_NAMES if n in present]
    return modules, parameters


def expert_lora_config(
    model: nn.Module,
    *,
    r: int = 8,
    alpha: int = 16,
    attention: bool = False,
    shared_experts: bool = False,
    **lora_kwargs: Any,
):
    """A ``peft.LoraConfig`` for :func:`expert_lora_targets` (``get_peft_model(model, config)`` applies it).

    ``lora_kwargs`` go to ``LoraConfig``; ``lora_dropout`` must stay 0 when fused experts are targeted
    (peft's ``ParamWrapper`` cannot apply dropout to the input of a parameter).
    """
    from peft import LoraConfig

    modules, parameters = expert_lora_targets(model, attention=attention, shared_experts=shared_experts)
    if parameters and lora_kwargs.get("lora_dropout", 0.0):
        raise MoEConfigError(
            "lora_dropout must be 0 with LoRA on fused (3-D) experts: peft's ParamWrapper cannot apply dropout there"
        )
    return LoraConfig(
        r=r, lora_alpha=alpha, target_modules=modules or None, target_parameters=parameters or None, **lora_kwargs
    )
