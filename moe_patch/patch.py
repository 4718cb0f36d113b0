"""Install and remove moe-patch on a live model: the only module that mutates a user's model."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters.base import PatchOptions, Undo
from .detect import BlockHandle, find_moe_blocks
from .detect.finder import model_root

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
    """

    model_class: str
    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    adapters: dict[str, int] = field(default_factory=dict)
    already_patched: bool = False
    offload: Any = None

    def __str__(self) -> str:
        if not self.patched and not self.skipped:
            return f"{self.model_class}: no Mixture-of-Experts block found; the model was not changed"
        head = "already patched; nothing changed" if self.already_patched else "patched"
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(self.adapters.items()))
        lines = [f"{self.model_class}: {head}: {len(self.patched)} MoE blocks" + (f" ({kinds})" if kinds else "")]
        lines += [f"  left unpatched {p}: {why}" for p, why in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class _PatchState:
    undos: list[Undo]
    report: PatchReport
    validate: bool
    offload: Any


def is_patched(model: torch.nn.Module) -> bool:
    # A peft PeftModel and the model it wraps share state, so patching either is the same patch.
    return getattr(model_root(model), STATE_ATTR, None) is not None


def patch_model(model: torch.nn.Module, *, validate: bool = True, offload: Any = None) -> PatchReport:
    """Install moe-patch dispatch on every MoE block of ``model``.

    Numerically the same as the Hugging Face forward (fp32 within 1e-5 relative), reversible with
    :func:`unpatch_model`, and idempotent: patching a patched model changes nothing.

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
        if (validate, offload) != (state.validate, state.offload):
            logger.warning("%s is already patched with other options; unpatch_model() first to change them.",
                           type(root).__name__)
        return dataclasses.replace(state.report, already_patched=True)
    handles = find_moe_blocks(root)
    report = PatchReport(model_class=type(root).__name__)
    if not handles:
        logger.warning("%s has no Mixture-of-Experts block moe-patch recognises; nothing was changed.",
                       type(root).__name__)
        return report
    options = PatchOptions(validate=validate)
    undos: list[Undo] = []
    if offload is not None:
        from .offload import attach_offload

        report.offload = attach_offload(root, handles, offload)
        undos.append(report.offload.detach)
        report.patched = [h.info.experts_path for h in handles]
        report.adapters = {"offload": len(handles)}
    else:
        try:
            for h in handles:
                reason = _install(h, options, undos)
                if reason:
                    report.skipped[h.info.experts_path] = reason
                else:
                    report.patched.append(h.info.experts_path)
        except BaseException:
            for undo in reversed(undos):
                undo()
            raise
        report.adapters = dict(Counter(h.info.adapter for h in handles if h.info.experts_path in report.patched))
    object.__setattr__(root, STATE_ATTR, _PatchState(undos=undos, report=report, validate=validate, offload=offload))
    logger.info("%s", report)
    return report


def _install(handle: BlockHandle, options: PatchOptions, undos: list[Undo]) -> str | None:
    """Install one block; returns a reason when the adapter declines it."""
    result = handle.adapter.install(handle, options)
    if isinstance(result, str):
        return result
    undos.append(result)
    return None


def unpatch_model(model: torch.nn.Module) -> bool:
    """Restore the original forward of every block :func:`patch_model` changed.

    Returns True when something was restored, False when the model was not patched.
    """
    root = model_root(model)
    state: _PatchState | None = getattr(root, STATE_ATTR, None)
    if state is None:
        return False
    for undo in reversed(state.undos):
        undo()
    root.__dict__.pop(STATE_ATTR, None)
    return True
