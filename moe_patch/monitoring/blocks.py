"""The MoE blocks the monitor and the trainer see, where detection alone does not see them right.

- peft: LoRA on 3-D expert parameters (``target_parameters``) wraps the experts in nested
  ``ParamWrapper`` modules (``experts.base_layer.base_layer``); detection then describes the innermost
  wrapper as the block and finds no router beside the experts. :func:`resolve_block` finds the real one.
- offloaded models: the offload engine replaces every routed expert tensor by an empty placeholder, so
  detection by parameter shapes finds nothing; the engine's own layer records say where the blocks are
  (:func:`moe_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..detect.finder import BlockHandle, find_moe_blocks, find_router, model_root
from ..detect.routing import infer_routing
from ..detect.spec import ExpertLayout, MoEBlock

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
    """Detection's blocks, or, for a model offloaded by moe-patch, blocks described from the engine's layers."""
    handles = find_moe_blocks(model)
    if handles:
        return handles
    from ..offload import get_offload_handle

    root = model_root(model)
    offload = get_offload_handle(root)
    if offload is None:
        return []
    out = []
    for layer in offload.layers:
        block = root.get_submodule(layer.path) if layer.path else root
        # The engine drives two storages: fused experts keep their (hidden, top_k_index, top_k_weights) call;
        # a ModuleList block routes inside its own forward, as the module_list adapter's blocks do.
        adapter = "module_list" if layer.storage == "module_list" else "offloaded_fused"
        info = MoEBlock(
            path=layer.path, experts_path=layer.experts_path, router_path=None, shared_paths=(), family="",
            adapter=adapter, num_experts=layer.num_experts, top_k=layer.top_k, hidden_size=0, intermediate_size=0,
            layout=ExpertLayout(storage=layer.storage, param_names=layer.param_names),
            routing=infer_routing(layer.router, block, layer.experts), params_per_expert=0, shared_params=0,
            router_params=0, dtype=str(layer.dtype).replace("torch.", ""))
        out.append(BlockHandle(info=info, block=block, experts=layer.experts, router=layer.router, adapter=None))
    return out
