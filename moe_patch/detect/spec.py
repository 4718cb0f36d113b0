"""What detection finds: small dataclasses describing MoE blocks, and the report over a model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExpertLayout:
    """How one block's expert weights are stored.

    Attributes:
        storage: ``"fused"`` (transformers 5 3-D parameters on one experts module),
            ``"module_list"`` (a ModuleList/ModuleDict of MLP modules), ``"flat_2d"`` (DBRX: experts
            stacked along rows of 2-D matrices), ``"dense_bmm"`` (Llama 4: 3-D, every expert computed).
        gated: GLU experts (gate and up projections) rather than up -> act -> down.
        transposed: weights stored ``[in, out]`` instead of nn.Linear's ``[out, in]``.
        interleaved: gate and up rows interleaved ``[g0, u0, g1, u1, ...]`` instead of ``[gate; up]``.
        bias: projections carry biases.
        post_norm: a norm is applied to each expert's output.
        param_names: per-expert parameter names on the experts module (fused/flat) or on each
            expert module (module_list), e.g. ``("gate_up_proj", "down_proj")``.
    """

    storage: str
    gated: bool = True
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    post_norm: bool = False
    param_names: tuple[str, ...] = ()

    def flags(self) -> str:
        out = [self.storage]
        out += [
            name
            for name, on in (
                ("gated", self.gated),
                ("transposed", self.transposed),
                ("interleaved", self.interleaved),
                ("bias", self.bias),
                ("post-norm", self.post_norm),
            )
            if on
        ]
        return ",".join(out)


@dataclass(frozen=True)
class RoutingSpec:
    """How the router turns logits into ``top_k_index``/``top_k_weights``.

    Attributes:
        kind: ``"softmax_topk"`` (softmax over all experts, then top-k), ``"topk_softmax"`` (top-k
            logits, then softmax over those), ``"sigmoid"`` (sigmoid scores), ``"sigmoid_topk"``
            (top-k logits, then sigmoid; Llama 4), ``"capacity"`` (top-1/2 with expert capacity;
            Switch, NLLB-MoE), ``"per_input"`` (the caller picks the expert, e.g. ViTPose+'s dataset
            index), ``"product_key"`` (Doge's product-key retrieval), ``"other"`` when it could not be told
            from the module.
        normalized: the chosen top-k weights are renormalised to sum to 1 (None: unknown).
        scaling_factor: weights are multiplied by this (DeepSeek's routed_scaling_factor).
        correction_bias: an ``e_score_correction_bias`` steers selection (DeepSeek-V3 style).
        groups / topk_groups: group-limited routing (experts in ``groups`` groups, top ``topk_groups``).
        zero_experts: identity "zero computation" experts beyond the real ones (LongCat-Flash).
    """

    kind: str = "other"
    normalized: bool | None = None
    scaling_factor: float = 1.0
    correction_bias: bool = False
    groups: int | None = None
    topk_groups: int | None = None
    zero_experts: int = 0

    def describe(self) -> str:
        parts = [self.kind]
        if self.normalized:
            parts.append("renorm")
        if self.scaling_factor != 1.0:
            parts.append(f"x{self.scaling_factor:g}")
        if self.correction_bias:
            parts.append("bias-corrected")
        if self.groups and self.groups > 1:
            parts.append(f"groups {self.topk_groups}/{self.groups}")
        if self.zero_experts:
            parts.append(f"+{self.zero_experts} zero experts")
        return ",".join(parts)


@dataclass(frozen=True)
class MoEBlock:
    """One Mixture-of-Experts block of a model.

    Attributes:
        path: module path of the block (the module holding router and experts).
        experts_path: module path of the routed experts container.
        router_path: module path of the router (None if the block computes logits inline).
        shared_paths: module paths of shared (always active) experts.
        family: transformers ``model_type`` of the config the block belongs to ("" when unknown).
        adapter: how moe-patch drives it: ``"experts_interface"`` for families decorated with
            transformers' ``@use_experts_implementation``, else the adapter's name.
        num_experts / top_k / hidden_size / intermediate_size: the block's shape.
        layout / routing: see :class:`ExpertLayout` and :class:`RoutingSpec`.
        params_per_expert: parameters of one routed expert.
        shared_params: parameters of the shared experts (always active).
        router_params: parameters of the router.
        dtype: dtype of the expert weights.
        zero_experts: identity ("zero computation") experts the router may pick besides the ``num_experts``
            routed ones (LongCat-Flash); their ids follow the routed ones.
    """

    path: str
    experts_path: str
    router_path: str | None
    shared_paths: tuple[str, ...]
    family: str
    adapter: str
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    layout: ExpertLayout
    routing: RoutingSpec
    params_per_expert: int
    shared_params: int
    router_params: int
    dtype: str
    zero_experts: int = 0

    @property
    def expert_params(self) -> int:
        return self.params_per_expert * self.num_experts

    @property
    def active_expert_params(self) -> int:
        return self.params_per_expert * self.top_k


@dataclass
class MoEReport:
    """Every MoE block of a model, with totals. ``str(report)`` is a table; ``report.to_json()`` JSON."""

    model_class: str
    family: str
    blocks: list[MoEBlock] = field(default_factory=list)
    total_params: int = 0
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def routed_expert_params(self) -> int:
        return sum(b.expert_params for b in self.blocks)

    @property
    def active_params(self) -> int:
        """Parameters used per token: everything but the routed experts not chosen."""
        return self.total_params - sum(b.expert_params - b.active_expert_params for b in self.blocks)

    @property
    def has_moe(self) -> bool:
        return bool(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class,
            "family": self.family,
            "num_moe_blocks": len(self.blocks),
            "total_params": self.total_params,
            "active_params": self.active_params,
            "routed_expert_params": self.routed_expert_params,
            "bytes_by_dtype": dict(self.bytes_by_dtype),
            "blocks": [asdict(b) for b in self.blocks],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def __str__(self) -> str:
        from .table import format_report

        return format_report(self)


@dataclass
class BlockHandle:
    """A detected block together with the live modules it describes, and the family that drives it."""

    info: MoEBlock
    block: Any  # torch.nn.Module (typed loosely: this module does not import torch)
    experts: Any
    router: Any
    family: Any  # moe_patch.families.base.Family

    @property
    def adapter(self) -> Any:
        """The family (its earlier name)."""
        return self.family
