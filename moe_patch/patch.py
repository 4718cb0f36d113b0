"""Install and remove moe-patch on a live model: the only module that mutates a user's model."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .dense_linears import install_dense_linears, is_dense_linear
from .detect.structure import model_root
from .families import PatchOptions, find_moe_blocks
from .families.fused import dispatches, install_choice_by_name
from .families.records import changed_modules, restore

logger = logging.getLogger(__name__)

STATE_ATTR = "_moe_patch_state"


@dataclass
class PatchReport:
    """What :func:`patch_model` did.

    Attributes:
        model_class: class name of the patched model.
        patched: experts module paths now dispatched by moe-patch.
        skipped: experts module path -> why it was left as it was.
        adapters: adapter name -> number of blocks it drives.
        already_patched: the model was patched before this call (nothing changed).
        offload: the offload handle when ``offload=`` was given (statistics live there).
        dense_linears: dense ``nn.Linear`` modules (attention, lm_head...) whose few-row inference calls go through
            the CPU kernels' GEMV where it is measured faster than torch's on this machine
            (:mod:`moe_patch.dense_linears`).
    """

    model_class: str
    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, int] = field(default_factory=dict)
    already_patched: bool = False
    offload: Any = None
    dense_linears: int = 0

    def __str__(self) -> str:
        if not self.patched and not self.skipped:
            return f"{self.model_class}: no Mixture-of-Experts block found; the model was not changed"
        head = "already patched; nothing changed" if self.already_patched else "patched"
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(self.adapters.items()))
        lines = [f"{self.model_class}: {head}: {len(self.patched)} MoE blocks" + (f" ({kinds})" if kinds else "")]
        if self.dense_linears:
            lines.append(
                f"  {self.dense_linears} dense linears decode through the CPU kernel GEMV where measured faster"
            )
        lines += [f"  left unpatched {p}: {why}" for p, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _PatchState:
    """Kept on the model root: what :func:`patch_model` reported and was asked. What was changed on each
    module is recorded on that module (``families.records.SAVED_ATTR``), so a copy of the model holds
    records about its own modules and :func:`unpatch_model` on either leaves the other alone."""

    report: PatchReport
    validate: bool
    offload: Any


def is_patched(model: torch.nn.Module) -> bool:
    """Whether moe-patch dispatches some MoE block of ``model`` now.

    False before :func:`patch_model`, after :func:`unpatch_model`, and once
    ``model.set_experts_implementation(name)`` has handed every patched block to ``name`` (any implementation,
    the one moe-patch stood in for included: only :func:`patch_model` hands them back).
    """
    # A peft PeftModel and the model it wraps share state, so patching either is the same patch.
    root = model_root(model)
    state: _PatchState | None = getattr(root, STATE_ATTR, None)
    if state is None:
        return False
    if state.report.offload is not None:
        return bool(getattr(state.report.offload, "attached", True))
    return any(dispatches(m) for m in changed_modules(root) if not is_dense_linear(m))


def patch_model(model: torch.nn.Module, *, validate: bool = True, offload: Any = None) -> PatchReport:
    """Install moe-patch dispatch on every MoE block of ``model``.

    Numerically the same as the Hugging Face forward (fp32 within 1e-5 relative), reversible with
    :func:`unpatch_model`, and idempotent: patching a patched model changes nothing. After
    ``model.set_experts_implementation(...)`` chose another implementation for every patched block,
    calling it again patches anew.

    Args:
        model: a transformers model, a peft ``PeftModel``, or any ``nn.Module`` holding MoE blocks.
        validate: check router output before each dispatch (non-finite weights or out-of-range expert
            indices raise :class:`moe_patch.RoutingError` naming the layer). Costs one host sync per
            block; pass False for speed on a model known to be good. Skipped inside ``torch.compile``
            graphs, where fused experts run transformers' sync-free grouped path.
        offload: expert offloading options (:class:`moe_patch.offload.OffloadOptions`, or a dict of its
            fields): routed experts are then paged between device cache, host RAM and the checkpoint.

    Returns:
        A :class:`PatchReport`; ``str(report)`` says what was done. A model with no MoE block is left
        unchanged and the report says so.
    """
    root = model_root(model)
    state: _PatchState | None = getattr(root, STATE_ATTR, None)
    if state is not None:
        if is_patched(root):
            if (validate, offload) != (state.validate, state.offload):
                logger.warning(
                    "%s is already patched with other options; unpatch_model() first to change them.",
                    type(root).__name__,
                )
            return dataclasses.replace(state.report, already_patched=True)
        unpatch_model(root)  # every block was handed to another implementation: start over
    handles = find_moe_blocks(root)
    report = PatchReport(model_class=type(root).__name__)
    if not handles:
        logger.warning(
            "%s has no Mixture-of-Experts block moe-patch recognises; nothing was changed.", type(root).__name__
        )
        return report
    if offload is not None:
        from .offload import attach_offload

        report.offload = attach_offload(root, handles, offload)
        report.patched = [h.info.experts_path for h in handles]
        report.adapters = {"offload": len(handles)}
    else:
        options = PatchOptions(validate=validate)
        try:
            for h in handles:
                reason = h.family.install(h, options)
                if reason:
                    report.skipped[h.info.experts_path] = reason
                else:
                    report.patched.append(h.info.experts_path)
            install_choice_by_name(root)
            experts = {id(m) for h in handles if isinstance(h.experts, torch.nn.Module) for m in h.experts.modules()}
            report.dense_linears = install_dense_linears(root, exclude=experts)
        except BaseException:
            for module in list(changed_modules(root)):
                restore(module)
            raise
        report.adapters = dict(Counter(h.info.adapter for h in handles if h.info.experts_path in report.patched))
    object.__setattr__(root, STATE_ATTR, _PatchState(report=report, validate=validate, offload=offload))
    logger.info("%s", report)
    return report


def unpatch_model(model: torch.nn.Module) -> bool:
    """Restore every attribute and forward :func:`patch_model` changed on ``model``'s modules.

    An experts implementation chosen with ``model.set_experts_implementation(...)`` after patching
    stays chosen. Returns what :func:`is_patched` said before the call: True when moe-patch was
    dispatching some block, False otherwise.
    """
    root = model_root(model)
    state: _PatchState | None = getattr(root, STATE_ATTR, None)
    if state is None:
        return False
    was_patched = is_patched(root)
    if state.report.offload is not None:
        state.report.offload.detach()
    for module in list(changed_modules(root)):
        restore(module)
    root.__dict__.pop(STATE_ATTR, None)
    return was_patched
