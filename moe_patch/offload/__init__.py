"""Expert offloading: page routed experts between a device cache, host RAM and the checkpoint files.

    model = moe_patch.load_model("path/or/repo", device="cuda", expert_cache="8GiB", host_cache="32GiB")
    model.generate(...)
    print(moe_patch.offload.get_offload_handle(model).stats)

``patch_model(model, offload=OffloadOptions(...))`` offloads a model that is already loaded; both go
through :func:`attach_offload`, whose handle's ``detach()`` restores the model.
"""

from __future__ import annotations

from .attach import OffloadHandle, attach_offload, get_offload_handle
from .budget import format_bytes, parse_bytes
from .costmodel import Bandwidths
from .loading import load_model
from .options import OffloadOptions
from .stats import OffloadStats

__all__ = [
    "Bandwidths",
    "OffloadHandle",
    "OffloadOptions",
    "OffloadStats",
    "attach_offload",
    "format_bytes",
    "get_offload_handle",
    "load_model",
    "parse_bytes",
]
