"""The expert-cache budget ``expert_cache="auto"`` chooses: the compute device's free memory, less what the run
needs besides the experts, less headroom.

The rule (the chosen budget is logged with each term)::

    expert_cache = free - 10% of free (headroom: allocator, fragmentation, workspaces)
                        - non-expert weights not yet on the device (attention, embeddings, norms, routers,
                          shared experts)
                        - KV cache for the context (transformers' own cache, measured on meta: :mod:`.footprint`)
                        - activations of a prefill over the context (an estimate: :func:`.footprint.activation_bytes`)
                        - the host cache, on a CPU (both tiers are the same RAM)
    capped at every routed expert (more buys nothing).

``free`` is ``torch.cuda.mem_get_info`` on CUDA and ``MemAvailable`` of ``/proc/meminfo`` on a CPU (what the
kernel can hand out without swapping). The context is ``OffloadOptions.context_tokens``, by default the model's
context capped at :data:`DEFAULT_CONTEXT_CAP` tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BudgetError
from ..sizes import format_bytes
from .footprint import HEADROOM, activation_bytes, kv_cache_elements, model_context
from .layers import OffloadLayer

logger = logging.getLogger(__name__)

#: Context the default budget leaves room for when none is given and the model's is longer.
DEFAULT_CONTEXT_CAP = 4096


@dataclass(frozen=True)
class AutoBudget:
    """The terms of the rule, in bytes, and the budget they leave (``expert_cache``)."""

    device: str
    free: int
    non_expert: int
    kv_cache: int
    activations: int
    host_cache: int
    context_tokens: int
    all_experts: int
    kv_measured: bool = True

    @property
    def headroom(self) -> int:
        return int(self.free * HEADROOM)

    @property
    def left(self) -> int:
        return self.free - self.headroom - self.non_expert - self.kv_cache - self.activations - self.host_cache

    @property
    def expert_cache(self) -> int:
        return max(0, min(self.all_experts, self.left))

    def __str__(self) -> str:
        kv = "KV cache" if self.kv_measured else "KV cache (estimated)"
        terms = [
            f"{format_bytes(self.free)} free on {self.device}",
            f"{HEADROOM:.0%} headroom",
            f"non-expert weights {format_bytes(self.non_expert)}",
            f"{kv} for {self.context_tokens} tokens {format_bytes(self.kv_cache)}",
            f"activations {format_bytes(self.activations)}",
        ]
        if self.host_cache:
            terms.append(f"host cache {format_bytes(self.host_cache)}")
        capped = " (every routed expert fits)" if self.left >= self.all_experts else ""
        return f"expert cache auto: {format_bytes(self.expert_cache)}{capped} = " + " - ".join(terms)


def default_context(config: Any) -> int:
    """The context the budget leaves room for when none is given: the model's, at most DEFAULT_CONTEXT_CAP."""
    return min(model_context(config) or DEFAULT_CONTEXT_CAP, DEFAULT_CONTEXT_CAP)


def free_memory(device: torch.device) -> int:
    """Bytes the compute device can still hand out: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":  # pragma: no cover - GPU only
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _bytes_to_bring(model: nn.Module, layers: list[OffloadLayer], device: torch.device) -> int:
    """Bytes of the model's non-expert parameters and buffers not yet on ``device`` (meta ones are still to load)."""
    experts = {id(layer.experts.get_parameter(p)) for layer in layers for p in layer.parameter_paths()}
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or id(t) in experts:
            continue
        seen.add(id(t))
        if t.device.type == "meta" or t.device.type != device.type:
            total += t.numel() * t.element_size()
    return total


def auto_expert_cache(
    model: nn.Module,
    layers: list[OffloadLayer],
    device: torch.device,
    *,
    host_cache: int | None,
    context_tokens: int | None,
    compute_dtype: torch.dtype | None = None,
    free: int | None = None,
) -> AutoBudget:
    """The terms of the rule for ``model`` on ``device`` (``free``: measured now unless given). Raises
    :class:`BudgetError` when they leave less than one expert."""
    config = model.config
    dtype = compute_dtype or layers[0].dtype
    tokens = context_tokens or default_context(config)
    elements, measured = kv_cache_elements(config, tokens)
    on_cpu = device.type == "cpu"
    # a CPU may keep half-precision experts in fp32 slots (plan.py): the cap allows for it
    widen = 2 if on_cpu and dtype.itemsize == 2 else 1
    budget = AutoBudget(
        device=str(device),
        free=free_memory(device) if free is None else free,
        non_expert=_bytes_to_bring(model, layers, device),
        kv_cache=elements * dtype.itemsize,
        activations=activation_bytes(config, tokens, dtype.itemsize),
        host_cache=(host_cache or 0) if on_cpu else 0,
        context_tokens=tokens,
        all_experts=widen * sum(layer.num_experts * layer.expert_bytes for layer in layers),
        kv_measured=measured,
    )
    one = max(layer.expert_bytes for layer in layers)
    if budget.expert_cache < one:

        def message(context: str, quantize: str, option: str) -> str:
            return (
                f"{option} auto: nothing is left for the experts on {device} ({budget}), and one expert takes "
                f"{format_bytes(one)}. Free memory on {device}, shorten the context ({context}), quantize the "
                f"experts ({quantize}) or give {option} a size."
            )

        raise BudgetError(
            message("context_tokens", "quantize_experts='nf4'", "expert_cache"),
            cli_message=message("--ctx-size", "--quantize nf4", "--expert-cache"),
        )
    logger.info("%s", budget)
    return budget
