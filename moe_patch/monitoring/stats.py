"""What the routing monitor reports: additive counters per MoE layer and the figures derived from them.

Pure: no torch, no hooks. :class:`LayerCounts` holds sums that add across calls and across windows
(``a + b``); every figure is a property computed from them, so a saved ``to_dict()`` can be re-derived
and two windows can be merged exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..offload.stats import coefficient_of_variation
from .table import FIGURES, format_routing

NAN = float("nan")


@dataclass
class LayerCounts:
    """Sums over every routed token one MoE layer saw.

    Attributes:
        path: module path of the experts.
        num_experts: routed experts (``assigned`` has ``num_experts + zero_experts`` entries: LongCat-Flash's
            identity "zero computation" experts come last and are left out of the balance figures).
        top_k: experts per token.
        tokens: tokens routed.
        assigned: (token, expert) slots dispatched to each expert (after capacity, for capacity families).
        requested: slots the router asked of each expert before capacity (capacity families; else empty).
        dropped_tokens: tokens no expert processed (every slot over capacity).
        weight_sum: sum over tokens of the routing weights the experts' outputs are multiplied by.
        logit_tokens: tokens whose router logits were seen and finite.
        entropy_sum: sum of the router distribution's entropy (nats) over those tokens.
        z_sum: sum of ``logsumexp(logits) ** 2`` (ST-MoE's router z-loss) over those tokens.
        prob_tokens / topk_prob_sum: tokens for which both logits and the chosen experts were seen, and the
            sum of the router probability on the chosen experts.
        nonfinite: non-finite values in router logits and routing weights.
        invalid: expert ids outside ``[0, num_experts + zero_experts)``.
    """

    path: str
    num_experts: int
    top_k: int
    zero_experts: int = 0
    tokens: int = 0
    assigned: list[int] = field(default_factory=list)
    requested: list[int] = field(default_factory=list)
    dropped_tokens: int = 0
    weight_sum: float = 0.0
    logit_tokens: int = 0
    entropy_sum: float = 0.0
    z_sum: float = 0.0
    prob_tokens: int = 0
    topk_prob_sum: float = 0.0
    nonfinite: int = 0
    invalid: int = 0

    def __post_init__(self) -> None:
        if not self.assigned:
            self.assigned = [0] * (self.num_experts + self.zero_experts)

    def __add__(self, other: LayerCounts) -> LayerCounts:
        if (other.path, other.num_experts, other.zero_experts) != (self.path, self.num_experts, self.zero_experts):
            raise ValueError(f"cannot add counts of {other.path} to counts of {self.path}")
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("path", "num_experts", "top_k", "zero_experts"):
                out[f.name] = a
            elif isinstance(a, list):
                out[f.name] = _add_lists(a, b)
            else:
                out[f.name] = a + b
        return LayerCounts(**out)

    # -- load balance (routed experts only) ------------------------------------------------------
    @property
    def load(self) -> list[int]:
        """Slots per routed expert."""
        return self.assigned[: self.num_experts]

    @property
    def load_cv(self) -> float:
        """Coefficient of variation of the load (0 = perfectly balanced; sqrt(E - 1) = one expert takes all)."""
        return coefficient_of_variation(self.load) if self.tokens else NAN

    @property
    def max_over_mean(self) -> float:
        """Busiest expert's load over the mean load (1 = balanced, E = one expert takes all)."""
        total = sum(self.load)
        return max(self.load) * self.num_experts / total if total else NAN

    @property
    def idle_share(self) -> float:
        """Share of routed experts that got no token at all."""
        return sum(1 for n in self.load if n == 0) / self.num_experts if self.tokens else NAN

    @property
    def zero_expert_share(self) -> float:
        """Share of slots that went to identity (zero computation) experts."""
        total = sum(self.assigned)
        return sum(self.assigned[self.num_experts :]) / total if total and self.zero_experts else NAN

    # -- routing weights and router distribution -------------------------------------------------
    @property
    def weight_mass(self) -> float:
        """Mean per token of the summed top-k routing weights (1 for renormalised routers)."""
        return self.weight_sum / self.tokens if self.tokens else NAN

    @property
    def topk_prob_mass(self) -> float:
        """Mean router probability on the chosen experts (1 = the router puts everything on its top-k)."""
        return self.topk_prob_sum / self.prob_tokens if self.prob_tokens else NAN

    @property
    def entropy(self) -> float:
        """Mean entropy of the router distribution, in nats."""
        return self.entropy_sum / self.logit_tokens if self.logit_tokens else NAN

    @property
    def normalized_entropy(self) -> float:
        """Entropy over its maximum ``log(E)``: 1 = uniform router, 0 = one expert per token with certainty."""
        width = self.num_experts + self.zero_experts
        return self.entropy / math.log(width) if width > 1 else NAN

    @property
    def z_loss(self) -> float:
        """Mean ``logsumexp(logits) ** 2`` (ST-MoE router z-loss, before its coefficient)."""
        return self.z_sum / self.logit_tokens if self.logit_tokens else NAN

    # -- capacity --------------------------------------------------------------------------------
    @property
    def dropped_slot_share(self) -> float:
        """Share of requested slots not dispatched (capacity families)."""
        asked = sum(self.requested)
        return (asked - sum(self.assigned)) / asked if asked else NAN

    @property
    def dropped_token_share(self) -> float:
        """Share of tokens that no expert processed (capacity families)."""
        return self.dropped_tokens / self.tokens if self.tokens and self.requested else NAN


def _add_lists(a: list, b: list) -> list:
    if not a:
        return list(b)
    if not b:
        return list(a)
    return [x + y for x, y in zip(a, b)]


@dataclass
class LayerRouting:
    """One layer's counts plus its routing stability (not additive, so kept beside the counts).

    ``top1_changed`` is the share of tokens whose top-1 expert differs between the last two
    stability checks on the same input (None before two checks).
    """

    counts: LayerCounts
    top1_changed: float | None = None

    def figures(self) -> dict[str, float]:
        out = {key: getattr(self.counts, prop) for key, prop, _ in FIGURES if prop}
        out["top1_changed"] = NAN if self.top1_changed is None else self.top1_changed
        out["nonfinite"] = float(self.counts.nonfinite)
        out["invalid_ids"] = float(self.counts.invalid)
        return out


@dataclass
class RoutingReport:
    """Routing of every monitored MoE layer over a window of forward calls.

    ``str(report)`` is a table; ``to_dict()``/``to_json()`` serialise the counts and the figures;
    ``log_figures()`` is the flat ``{name: float}`` a logger takes.
    """

    layers: list[LayerRouting]
    calls: int = 0
    step: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return max((lr.counts.tokens for lr in self.layers), default=0)

    def figure(self, key: str) -> list[float]:
        """One figure across layers, in layer order."""
        return [lr.figures()[key] for lr in self.layers]

    def log_figures(self, prefix: str = "routing/", per_layer: bool = False) -> dict[str, float]:
        """Aggregates over layers (worst-case for balance, mean for the rest), optionally every layer.

        Figures a layer could not measure (NaN: no logits, no capacity) are left out of the aggregates,
        and a key is omitted when no layer measured it, so loggers only see real numbers.
        """
        out: dict[str, float] = {}
        worst = {"load_cv", "max_over_mean", "idle_share", "dropped_slots", "top1_changed"}
        for key, _, _ in FIGURES:
            values = [v for v in self.figure(key) if not math.isnan(v)]
            if not values:
                continue
            if key in worst:
                out[f"{prefix}{key}_max"] = max(values)
            out[f"{prefix}{key}_mean"] = sum(values) / len(values)
        out[f"{prefix}nonfinite"] = float(sum(lr.counts.nonfinite for lr in self.layers))
        if per_layer:
            for i, lr in enumerate(self.layers):
                for key, value in lr.figures().items():
                    if not math.isnan(value):
                        out[f"{prefix}layer{i}/{key}"] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "step": self.step,
            "tokens": self.tokens,
            "skipped": dict(self.skipped),
            "layers": [
                {
                    "counts": asdict(lr.counts),
                    "top1_changed": lr.top1_changed,
                    "figures": {k: _json_float(v) for k, v in lr.figures().items()},
                }
                for lr in self.layers
            ],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoutingReport:
        layers = [LayerRouting(LayerCounts(**d["counts"]), d.get("top1_changed")) for d in data["layers"]]
        return cls(layers=layers, calls=data.get("calls", 0), step=data.get("step"), skipped=data.get("skipped", {}))

    def __str__(self) -> str:
        return format_routing(self)


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else v
