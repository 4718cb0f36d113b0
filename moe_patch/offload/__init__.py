"""Expert offloading: page routed experts between a device cache, host RAM and the checkpoint files.

    model = moe_patch.load_model("path/or/repo", device="cuda", expert_cache="8GiB", host_cache="32GiB")
    model.generate(...)
    print(moe_patch.offload.get_offload_handle(model).stats)

``patch_model(model, offload=OffloadOptions(...))`` offloads a model that is already loaded; both go
through :func:`attach_offload`, whose handle's ``detach()`` restores the model.
"""

from __future__ import annotations

import importlib

# Lazy, like moe_patch/__init__: `moe-patch --help` and `import moe_patch.offload.cli` must not pay for
# transformers' conversion machinery. Name -> submodule that defines it.
_EXPORTS = {
    "OffloadHandle": "attach",
    "attach_offload": "attach",
    "get_offload_handle": "attach",
    "format_bytes": "budget",
    "parse_bytes": "budget",
    "Bandwidths": "costmodel",
    "load_model": "loading",
    "OffloadOptions": "options",
    "OffloadStats": "stats",
    "MemoryPlan": "planner",
    "plan_memory": "planner",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Bandwidths",
    "OffloadHandle",
    "OffloadOptions",
    "OffloadStats",
    "MemoryPlan",
    "plan_memory",
    "attach_offload",
    "format_bytes",
    "get_offload_handle",
    "load_model",
    "parse_bytes",
]
