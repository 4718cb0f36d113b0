"""moe-patch: make Mixture-of-Experts models from Hugging Face transformers practical on one machine.

Public API::

    report = moe_patch.inspect_model(model)        # find and describe every MoE block
    patch = moe_patch.patch_model(model)           # faster exact dispatch (reversible, idempotent)
    moe_patch.unpatch_model(model)
    model = moe_patch.load_model(path, device="cuda", expert_cache="8GiB", host_cache="32GiB")
    with moe_patch.monitor(model) as mon: ...      # routing per MoE layer: mon.summary(), mon.plot(path)
"""

from __future__ import annotations

from .errors import (
    BudgetError,
    CheckpointError,
    MoEConfigError,
    MoEPatchError,
    NoMoEFoundError,
    RoutingError,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "CheckpointError",
    "MoEConfigError",
    "MoEPatchError",
    "NoMoEFoundError",
    "RoutingError",
    "__version__",
    "inspect_model",
    "patch_model",
    "unpatch_model",
    "load_model",
    "monitor",
]


def __getattr__(name: str):
    # Lazy: `import moe_patch` must not import transformers' model zoo.
    if name == "inspect_model":
        from .families import inspect_model

        return inspect_model
    if name in ("patch_model", "unpatch_model", "PatchReport"):
        from . import patch

        return getattr(patch, name)
    if name == "load_model":
        from .offload import load_model

        return load_model
    if name == "monitor":
        from .monitoring import monitor

        return monitor
    raise AttributeError(f"module 'moe_patch' has no attribute {name!r}")
