"""DBRX: experts stacked along the rows of 2-D matrices ``w1, v1, w2 [E*F, H]``; ``w2`` is used as
``x @ w2`` (transposed). Viewed as ``[E, F, H]`` banks, no copy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.experts import ExpertBank, bank_dispatch
from ..validation import NAME_ATTR, VALIDATE_ATTR, check_routing
from .base import Adapter, PatchOptions, bind_forward, set_attrs

if TYPE_CHECKING:
    from ..detect.finder import BlockHandle


def _bank(experts: torch.nn.Module) -> ExpertBank:
    mlp, E = experts.mlp, experts.num_experts
    shape = (E, -1, mlp.w1.shape[-1])
    act = mlp.activation_fn
    return ExpertBank(up=mlp.v1.view(shape), gate=mlp.w1.view(shape), down=mlp.w2.view(shape),
                      activate=lambda g, u: act(g) * u, transposed=False, down_transposed=True)


def _dbrx_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    batch_size = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.hidden_size)
    check_routing(self, top_k_index, top_k_weights)
    out = bank_dispatch(_bank(self), x, top_k_index, top_k_weights)
    return out.view(batch_size, -1, self.hidden_size)


class DbrxAdapter(Adapter):
    name = "flat_2d"

    def match(self, block, name, experts) -> bool:
        mlp = getattr(experts, "mlp", None)
        return (mlp is not None and all(getattr(getattr(mlp, n, None), "dim", lambda: 0)() == 2
                                        for n in ("w1", "v1", "w2"))
                and hasattr(experts, "num_experts") and mlp.w1.shape[0] % experts.num_experts == 0)

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts.mlp.w1.shape[1]), int(experts.mlp.w1.shape[0] // experts.num_experts)

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(storage="flat_2d", gated=True, param_names=("mlp.w1", "mlp.v1", "mlp.w2"))

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        set_attrs(handle.experts, **{NAME_ATTR: handle.info.experts_path, VALIDATE_ATTR: options.validate})
        bind_forward(handle.experts, _dbrx_experts_forward)
