"""DBRX: experts stacked along the rows of 2-D matrices ``w1, v1, w2 [E*F, H]``; ``w2`` is used as
``x @ w2`` (transposed). Viewed as ``[E, F, H]`` banks, no copy; in the checkpoint, expert ``e`` is chunk ``e``
of ``E`` along the rows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..detect.spec import ExpertLayout
from ..dispatch.experts import ExpertBank
from .base import ExpertTensors, Family, PatchOptions, ResidentRunner, run_experts
from .records import bind_forward

if TYPE_CHECKING:
    from ..detect.spec import BlockHandle

_NAMES = ("mlp.w1", "mlp.v1", "mlp.w2")


def _bank(experts: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> ExpertBank:
    mlp, E = experts.mlp, experts.num_experts
    act = mlp.activation_fn
    if weights is None:  # the module's own [E * F, H] parameters viewed as [E, F, H]
        shape = (E, -1, mlp.w1.shape[-1])
        weights = {"mlp.w1": mlp.w1.view(shape), "mlp.v1": mlp.v1.view(shape), "mlp.w2": mlp.w2.view(shape)}
    return ExpertBank(
        up=weights["mlp.v1"],
        gate=weights["mlp.w1"],
        down=weights["mlp.w2"],
        activate=lambda g, u: act(g) * u,
        transposed=False,
        down_transposed=True,
    )


def _dbrx_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    batch_size = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.hidden_size)
    out = run_experts(self, x, top_k_index, top_k_weights)
    return out.view(batch_size, -1, self.hidden_size)


class DbrxFamily(Family):
    name = "flat_2d"
    offload_unsupported = None

    def match(self, block, name, experts) -> bool:
        mlp = getattr(experts, "mlp", None)
        return (
            mlp is not None
            and all(getattr(getattr(mlp, n, None), "dim", lambda: 0)() == 2 for n in ("w1", "v1", "w2"))
            and hasattr(experts, "num_experts")
            and mlp.w1.shape[0] % experts.num_experts == 0
        )

    def sizes(self, experts) -> tuple[int, int]:
        return int(experts.mlp.w1.shape[1]), int(experts.mlp.w1.shape[0] // experts.num_experts)

    def layout(self, experts) -> ExpertLayout:
        return ExpertLayout(storage="flat_2d", gated=True, param_names=_NAMES)

    def install(self, handle: BlockHandle, options: PatchOptions) -> None:
        self.install_resident(handle, options, ResidentRunner(_bank))

    def lora_targets(self, handle: BlockHandle) -> None:
        return None  # 2-D stacks: a LoRA factor pair would span every expert at once

    def bind_routed(self, handle: BlockHandle) -> None:
        bind_forward(handle.experts, _dbrx_experts_forward)

    def expert_tensors(self, experts) -> ExpertTensors:
        n = int(experts.num_experts)
        full = {name: experts.get_parameter(name) for name in _NAMES}
        return ExpertTensors(
            _NAMES, {name: (t.shape[0] // n, *t.shape[1:]) for name, t in full.items()}, full["mlp.w2"].dtype, n
        )

    def expert_slice(self, full: torch.Tensor, expert: int, num_experts: int) -> torch.Tensor:
        return full.view(num_experts, full.shape[0] // num_experts, *full.shape[1:])[expert]

    def stack(self, per_expert: list[torch.Tensor]) -> torch.Tensor:
        out = torch.stack(per_expert)
        return out.reshape(-1, *out.shape[2:])

    def checkpoint_split(self, num_experts: int) -> int:
        return num_experts

    def slot_bank(self, experts, weights) -> ExpertBank:
        return _bank(experts, weights)
