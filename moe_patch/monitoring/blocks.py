"""The MoE blocks the monitor and the trainer see, where detection alone does not see them right.

- peft: LoRA on 3-D expert parameters (``target_parameters``) wraps the experts in nested
  ``ParamWrapper`` modules (``experts.base_layer.base_layer``); detection then describes the innermost
  wrapper as the block and finds no router beside the experts. :func:`resolve_block` finds the real one.
- offloaded models: the offload engine replaces every routed expert tensor by an empty placeholder, so
  detection by parameter shapes finds nothing; the engine kept the blocks it detected before
  (:func:`moe_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..detect.spec import BlockHandle
from ..detect.structure import find_router, model_root
from ..families import find_moe_blocks

_WRAPPED = ".base_layer"


@dataclass
class ResolvedBlock:
    """``block`` holds ``experts_name`` (the outermost experts container, peft wrappers included) and
    ``router`` (None if none was found)."""

    path: str
    block: nn.Module
    experts_name: str
    experts: nn.Module
    router: nn.Module | None


def resolve_block(root: nn.Module, handle: BlockHandle) -> ResolvedBlock:
    experts_path = handle.info.experts_path
    while experts_path.endswith(_WRAPPED):
        experts_path = experts_path[: -len(_WRAPPED)]
    if experts_path == handle.info.experts_path:
        name = experts_path.rpartition(".")[2]
        return ResolvedBlock(handle.info.path, handle.block, name, handle.experts, handle.router)
    path, _, name = experts_path.rpartition(".")
    block = root.get_submodule(path) if path else root
    router = handle.router or find_router(block, name, handle.info.num_experts, handle.info.hidden_size)[1]
    return ResolvedBlock(path, block, name, getattr(block, name), router)


def moe_blocks(model: nn.Module) -> list[BlockHandle]:
    """Detection's blocks, or, for a model offloaded by moe-patch, the blocks the engine detected."""
    handles = find_moe_blocks(model)
    if handles:
        return handles
    from ..offload import get_offload_handle

    root = model_root(model)
    offload = get_offload_handle(root)
    if offload is None:
        return []
    return [layer.handle for layer in offload.layers]  # detected before the weights left: still true
