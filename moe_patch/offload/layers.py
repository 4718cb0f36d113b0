"""Which modules hold the experts to offload, described as small records (no I/O, no mutation).

Uses :func:`moe_patch.detect.find_moe_blocks` handles when given (or importable); otherwise a
structural search that recognises the fused and module_list storages. The storages the engine drives:

- ``fused``: transformers 5 experts modules (3-D ``gate_up_proj``/``up_proj``/``down_proj``
  parameters, ``has_gate``/``is_transposed``/``has_bias`` flags);
- ``dense_bmm``: Llama 4's experts, ``gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]`` without
  those flags (transformers computes every expert for every token; the engine routes top-k);
- ``flat_2d``: DBRX's experts, ``mlp.w1/v1/w2 [E * F, H]`` (expert ``e`` is rows ``e*F:(e+1)*F``);
- ``module_list``: an ``nn.ModuleList`` of identical expert MLP modules next to a router.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..dispatch.experts import expert_weight_names
from ..errors import NoMoEFoundError

logger = logging.getLogger(__name__)


STORAGES = ("fused", "dense_bmm", "flat_2d", "module_list")


@dataclass
class OffloadLayer:
    """One MoE block whose routed experts are offloaded.

    Attributes:
        index: position among the offloaded blocks (the prefetcher's notion of "next layer").
        path / experts_path: module paths of the block and of its experts container.
        experts: the experts module (fused) or ModuleList (module_list).
        router: the module that routes the block's tokens (used to predict the next block's experts).
        storage: ``"fused"``, ``"dense_bmm"``, ``"flat_2d"`` or ``"module_list"`` (module doc).
        param_names: per-expert tensor names: parameter paths inside the experts module
            (``gate_up_proj``, ``mlp.w1``...) or inside one expert module (``w1.weight``...).
        shapes: per-expert shape of each tensor; dtype: their dtype in the model.
    """

    index: int
    path: str
    experts_path: str
    experts: nn.Module
    router: nn.Module | None
    storage: str
    num_experts: int
    top_k: int
    param_names: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in the model dtype."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(s) for s in self.shapes.values()) * size

    def expert_slice(self, full: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s part of one stacked parameter (a view)."""
        if self.storage == "flat_2d":
            return full.view(self.num_experts, full.shape[0] // self.num_experts, *full.shape[1:])[e]
        return full[e]

    def stack(self, name: str, per_expert: list[torch.Tensor]) -> torch.Tensor:
        """The stacked parameter ``name`` from every expert's slice (inverse of :meth:`expert_slice`)."""
        out = torch.stack(per_expert)
        return out.reshape(-1, *out.shape[2:]) if self.storage == "flat_2d" else out


def _router_of(block: nn.Module, experts: nn.Module, num_experts: int) -> nn.Module | None:
    for name in ("gate", "router"):
        mod = getattr(block, name, None)
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts:
            return mod
    for mod in block.children():
        w = getattr(mod, "weight", None)
        if mod is not experts and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == num_experts:
            return mod
    return None


def _top_k(block: nn.Module, router: nn.Module | None, config: Any) -> int:
    for mod in (router, block):
        for attr in ("top_k", "num_experts_per_tok"):
            v = getattr(mod, attr, None)
            if isinstance(v, int):
                return v
    return int(getattr(config, "num_experts_per_tok", 1))


def _is_fused(mod: nn.Module) -> bool:
    down = getattr(mod, "down_proj", None)
    return hasattr(mod, "has_gate") and isinstance(down, torch.Tensor) and down.dim() == 3


def _is_module_list(mod: nn.Module) -> bool:
    if not isinstance(mod, nn.ModuleList) or len(mod) < 2:
        return False
    first = mod[0]
    names = [(n, tuple(p.shape)) for n, p in first.named_parameters()]
    return bool(names) and all(
        type(m) is type(first) and [(n, tuple(p.shape)) for n, p in m.named_parameters()] == names for m in mod
    )


def _structural_search(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module | None, str]]:
    modules = dict(model.named_modules())
    found = []
    for path, mod in modules.items():
        storage = "fused" if _is_fused(mod) else "module_list" if _is_module_list(mod) else None
        if storage is None:
            continue
        parent_path = path.rpartition(".")[0]
        block = modules[parent_path]
        n = mod.num_experts if storage == "fused" else len(mod)
        router = _router_of(block, mod, n)
        if storage == "module_list" and router is None:
            continue  # a plain list of layers, not experts
        found.append((parent_path, block, mod, router, storage))
    return found


def find_offload_layers(model: nn.Module, handles: list[Any] | None = None) -> list[OffloadLayer]:
    """The model's MoE blocks in forward order, from detection handles or a structural search."""
    if handles and all(isinstance(h, OffloadLayer) for h in handles):
        return list(handles)
    if handles is None:
        try:
            from ..detect import find_moe_blocks  # the foundation's detector, when installed
        except ImportError:
            find_moe_blocks = None
        if find_moe_blocks is not None:
            try:
                handles = find_moe_blocks(model)
            except Exception:  # noqa: BLE001 - detection is an optimisation here, structure is enough
                handles = None
    entries = []
    skipped: list[str] = []
    if handles:
        names = {id(m): n for n, m in model.named_modules()}
        for h in handles:
            info = getattr(h, "info", None)
            experts = h.experts
            storage = getattr(getattr(info, "layout", None), "storage", None) or (
                "fused" if _is_fused(experts) else "module_list"
            )
            if storage not in STORAGES or (storage == "fused" and not hasattr(experts, "has_gate")):
                # undecorated fused experts (LongCat-Flash's zero experts, step3p7) have no layout flags
                # the offloaded forward can follow: they stay resident
                skipped.append(f"{getattr(info, 'experts_path', '?')} ({type(experts).__name__})")
                continue
            block = getattr(h, "block", None)
            entries.append((getattr(info, "path", None) or names.get(id(block), ""), block, experts, getattr(h, "router", None), storage))
    else:
        entries = _structural_search(model)
    if not entries:
        raise NoMoEFoundError(
            f"{type(model).__name__}: found no Mixture-of-Experts block whose experts moe-patch can offload "
            "(transformers-5 experts with the experts decorator, Llama 4, DBRX, or a ModuleList of expert MLPs)"
            + (f"; not offloadable: {', '.join(skipped[:3])}" if skipped else "") + "."
        )
    if skipped:
        logger.warning("offload: %d MoE blocks stay resident (experts without layout flags): %s", len(skipped),
                       ", ".join(skipped[:3]))
    names = {id(m): n for n, m in model.named_modules()}
    config = getattr(model, "config", None)
    layers = []
    for i, (path, block, experts, router, storage) in enumerate(entries):
        if storage == "fused":
            pnames = expert_weight_names(experts)
            shapes = {n: tuple(getattr(experts, n).shape[1:]) for n in pnames}
            dtype = experts.down_proj.dtype
            n_exp = int(experts.num_experts)
        elif storage == "dense_bmm":
            pnames = ("gate_up_proj", "down_proj")
            shapes = {n: tuple(getattr(experts, n).shape[1:]) for n in pnames}
            dtype = experts.down_proj.dtype
            n_exp = int(experts.gate_up_proj.shape[0])
        elif storage == "flat_2d":
            pnames = ("mlp.w1", "mlp.v1", "mlp.w2")
            n_exp = int(experts.num_experts)
            full = {n: experts.get_parameter(n) for n in pnames}
            shapes = {n: (t.shape[0] // n_exp, *t.shape[1:]) for n, t in full.items()}
            dtype = full["mlp.w2"].dtype
        else:
            pnames = tuple(n for n, _ in experts[0].named_parameters())
            shapes = {n: tuple(p.shape) for n, p in experts[0].named_parameters()}
            dtype = next(experts[0].parameters()).dtype
            n_exp = len(experts)
        router = router if router is not None else _router_of(block, experts, n_exp)
        layers.append(
            OffloadLayer(
                index=i, path=path, experts_path=names[id(experts)], experts=experts, router=router,
                storage=storage, num_experts=n_exp, top_k=_top_k(block, router, config),
                param_names=pnames, shapes=shapes, dtype=dtype,
            )
        )
    return layers
