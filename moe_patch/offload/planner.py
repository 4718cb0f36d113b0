"""Where a model's routed experts would live under given budgets, before anything is loaded.

Policy only: sizes come from a :class:`moe_patch.detect.MoEReport` (built from config.json on the meta
device) and the KV cache and activations of a context (:mod:`.footprint`), no I/O.
`moe-patch inspect PATH --gpu 24GiB --ram 64GiB [--ctx-size N]` prints it. The device holds what
``expert_cache="auto"`` leaves room for (:mod:`.auto_budget`): the non-expert weights, the KV cache, the
activations and a headroom, then as many experts as fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..detect.spec import MoEReport
from ..detect.table import human_bytes
from .budget import parse_bytes
from .footprint import HEADROOM


@dataclass(frozen=True)
class MemoryPlan:
    """Expert placement for one budget pair.

    Attributes:
        bytes_per_param: bytes of one routed-expert weight as stored (fractional for FP4/int4 with scales).
        non_expert_bytes: attention, embeddings, norms, routers, shared experts (always on the device).
        expert_bytes: all routed experts.
        device_expert_bytes / host_expert_bytes / disk_expert_bytes: where the experts land (device
            first, then host RAM, the rest read from the checkpoint on demand).
        routed_bytes_per_token: routed-expert bytes one decode token needs (sum over layers of top-k experts).
        hit_rate_low / hit_rate_high: expected device-cache hit rate: the cached fraction of each layer's
            experts (uniform routing), and the routing mass of the same number of most-used experts if
            popularity follows Zipf's law (skewed routing, as measured on real MoEs).
        context_tokens / kv_cache_bytes / activation_bytes: the context the plan is for, its KV cache and the
            activations of a prefill over it (on the device, beside the non-expert weights); ``kv_exact``:
            the KV cache was measured on transformers' own cache (False: estimated from the config).
        fits: False when the non-expert weights, KV cache and activations alone exceed the device budget.
    """

    bytes_per_param: float
    device_budget: int | None
    host_budget: int | None
    non_expert_bytes: int
    expert_bytes: int
    device_expert_bytes: int
    host_expert_bytes: int
    disk_expert_bytes: int
    routed_bytes_per_token: int
    hit_rate_low: float
    hit_rate_high: float
    fits: bool
    context_tokens: int = 0
    kv_cache_bytes: int = 0
    activation_bytes: int = 0
    kv_exact: bool = True

    def _context_line(self) -> str:
        kv = "" if self.kv_exact else " (estimated from config.json)"
        return (
            f"KV cache for {self.context_tokens} tokens {human_bytes(self.kv_cache_bytes)}{kv}, activations "
            f"{human_bytes(self.activation_bytes)}"
        )

    def __str__(self) -> str:
        if not self.fits:
            return (
                f"  memory plan: the non-expert weights ({human_bytes(self.non_expert_bytes)}), "
                f"{self._context_line()} do not fit the device budget {human_bytes(self.device_budget or 0)} "
                f"with {HEADROOM:.0%} kept free"
            )
        lines = [
            "  memory plan "
            f"(device {human_bytes(self.device_budget) if self.device_budget is not None else 'unlimited'}, "
            f"host RAM {human_bytes(self.host_budget) if self.host_budget is not None else 'unlimited'}, "
            f"{self.bytes_per_param:g} bytes per expert param):",
            f"    on the device: non-expert weights {human_bytes(self.non_expert_bytes)}, {self._context_line()}, "
            f"{HEADROOM:.0%} headroom",
            f"    routed experts {human_bytes(self.expert_bytes)}: device cache {human_bytes(self.device_expert_bytes)}"
            f" ({self._pct(self.device_expert_bytes)}), host RAM {human_bytes(self.host_expert_bytes)}"
            f" ({self._pct(self.host_expert_bytes)}), disk {human_bytes(self.disk_expert_bytes)}"
            f" ({self._pct(self.disk_expert_bytes)})",
            f"    decode, batch 1: {human_bytes(self.routed_bytes_per_token)} of routed experts per token; "
            f"device-cache hit rate {self.hit_rate_low:.0%} (uniform routing) to {self.hit_rate_high:.0%} "
            f"(Zipf-skewed routing), so {human_bytes((1 - self.hit_rate_high) * self.routed_bytes_per_token)}"
            f" to {human_bytes((1 - self.hit_rate_low) * self.routed_bytes_per_token)} per token from RAM/disk",
        ]
        return "\n".join(lines)

    def _pct(self, part: int) -> str:
        return f"{100 * part / max(self.expert_bytes, 1):.0f}%"


def _zipf_mass(cached: int, total: int) -> float:
    """Routing mass of the `cached` most popular of `total` experts when popularity ~ 1/rank."""
    if total <= 0:
        return 0.0
    harmonic = sum(1.0 / r for r in range(1, total + 1))
    return sum(1.0 / r for r in range(1, min(cached, total) + 1)) / harmonic


def plan_memory(
    report: MoEReport,
    *,
    gpu: int | str | None = None,
    ram: int | str | None = None,
    bytes_per_param: int = 2,
    expert_bytes_per_param: float | None = None,
    context_tokens: int = 0,
    kv_cache_bytes: int = 0,
    activation_bytes: int = 0,
    kv_exact: bool = True,
) -> MemoryPlan:
    """Place the routed experts of ``report`` under a device budget ``gpu`` and a host budget ``ram``
    (bytes or strings such as ``"24GiB"``; None = unlimited). Every layer gets the same share.

    ``expert_bytes_per_param``: bytes per routed-expert parameter as the checkpoint stores them (FP8,
    MXFP4, int4: :meth:`QuantizationSpec.expert_bytes_per_param`), which is what the caches and reads hold;
    default ``bytes_per_param``. Non-expert weights count ``bytes_per_param`` (they are decoded at load).
    ``kv_cache_bytes`` and ``activation_bytes`` (of ``context_tokens``: :mod:`.footprint`) take device memory
    before the experts do."""
    device = parse_bytes(gpu, name="--gpu")
    host = parse_bytes(ram, name="--ram")
    expert_params = report.routed_expert_params
    non_expert = (report.total_params - expert_params) * bytes_per_param
    per_param = bytes_per_param if expert_bytes_per_param is None else expert_bytes_per_param
    experts = int(expert_params * per_param)
    on_device_first = non_expert + kv_cache_bytes + activation_bytes
    free_device = None if device is None else int(device * (1 - HEADROOM)) - on_device_first
    fits = free_device is None or free_device >= 0
    on_device = experts if free_device is None else max(0, min(experts, free_device))
    on_host = experts - on_device if host is None else min(experts - on_device, host)
    per_token = int(sum(b.active_expert_params for b in report.blocks) * per_param)
    frac = on_device / experts if experts else 1.0
    # The same fraction of every layer's experts is cached; the most-used ones under skewed routing.
    per_layer = [(round(frac * b.num_experts), b.num_experts) for b in report.blocks] or [(0, 1)]
    low = sum(c / n for c, n in per_layer) / len(per_layer)
    high = sum(_zipf_mass(c, n) for c, n in per_layer) / len(per_layer)
    return MemoryPlan(
        bytes_per_param=per_param,
        device_budget=device,
        host_budget=host,
        non_expert_bytes=non_expert,
        expert_bytes=experts,
        device_expert_bytes=on_device,
        host_expert_bytes=on_host,
        disk_expert_bytes=experts - on_device - on_host,
        routed_bytes_per_token=per_token,
        hit_rate_low=low,
        hit_rate_high=max(low, high),
        fits=fits,
        context_tokens=context_tokens,
        kv_cache_bytes=kv_cache_bytes,
        activation_bytes=activation_bytes,
        kv_exact=kv_exact,
    )
