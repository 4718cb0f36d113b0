"""What the offload engine measured: hit rates, bytes per tier, stalls, prefetch quality, utilisation.

Counters are plain integers and floats filled by the engine; every derived figure is a property or
a pure function, so the report can be recomputed from a saved ``to_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .budget import format_bytes
from .costmodel import Bandwidths

TIERS = ("device", "host", "disk")
PHASES = ("prefill", "decode")


@dataclass
class LayerStats:
    """Counters of one offloaded MoE block."""

    num_experts: int
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    cpu_computed: int = 0
    slot_counts: torch.Tensor | None = field(default=None, repr=False)  # routed (token, k) slots per expert
    predicted: int = 0  # experts the prefetcher predicted for this layer
    predicted_used: int = 0  # ... that the router then chose
    used_when_predicted: int = 0  # active experts in the steps that had a prediction

    def __post_init__(self):
        # a CPU tensor: one add per layer step, no Python per expert
        if self.slot_counts is None:
            self.slot_counts = torch.zeros(self.num_experts, dtype=torch.int64)

    @property
    def slots(self) -> list[int]:
        """Routed (token, k) slots per expert."""
        return self.slot_counts.tolist()

    def add_slots(self, counts) -> None:
        """Add one step's routed slots per expert (a CPU tensor or a list, ``num_experts`` long)."""
        self.slot_counts += torch.as_tensor(counts, dtype=torch.int64)

    @property
    def requests(self) -> int:
        return sum(self.hits.values())

    @property
    def hit_rate(self) -> float:
        """Fraction of expert uses served from the device cache."""
        return self.hits["device"] / self.requests if self.requests else float("nan")

    @property
    def load_cv(self) -> float:
        """Coefficient of variation of routed slots across experts (0 = perfectly balanced)."""
        return coefficient_of_variation(self.slots)

    @property
    def precision(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else float("nan")

    @property
    def recall(self) -> float:
        return self.predicted_used / self.used_when_predicted if self.used_when_predicted else float("nan")


def read_proc_io() -> int | None:
    """``read_bytes`` of ``/proc/self/io`` (storage reads the kernel did for this process), None elsewhere."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def coefficient_of_variation(values: list[int] | list[float]) -> float:
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if mean == 0:
        return float("nan")
    var = sum((v - mean) ** 2 for v in values) / n
    return math.sqrt(var) / mean


def bandwidth_bound_s(bytes_by_source: dict[str, float], bw: dict[str, float]) -> float:
    """DESIGN.md section 5: with transfers overlapped, a step takes at least the slowest source's time.

    ``bytes_by_source`` and ``bw`` are keyed alike (e.g. ``dram``, ``disk``, ``h2d``); sources with
    no measured bandwidth are ignored.
    """
    times = [b / bw[k] for k, b in bytes_by_source.items() if bw.get(k, 0) > 0 and b > 0]
    return max(times, default=0.0)


def _counter(factory):
    """A field :meth:`OffloadStats.reset` zeroes (a new counter is reset without touching ``reset``)."""
    return field(default_factory=factory, metadata={"counter": True})


@dataclass
class OffloadStats:
    """Everything the engine counted since attach (or the last ``reset()``)."""

    layers: list[LayerStats]
    device: str = "cpu"
    expert_bytes: int = 0
    bytes_read: dict[str, dict[str, int]] = _counter(lambda: {p: dict.fromkeys(TIERS, 0) for p in PHASES})
    tokens: dict[str, int] = _counter(lambda: dict.fromkeys(PHASES, 0))
    steps: dict[str, int] = _counter(lambda: dict.fromkeys(PHASES, 0))
    seconds: dict[str, float] = _counter(lambda: dict.fromkeys(PHASES, 0.0))
    stall_s: float = _counter(float)
    disk_read_s: float = _counter(float)
    disk_bytes_total: int = _counter(int)
    prefetch_issued: int = _counter(int)
    prefetch_dropped: int = _counter(int)  # queued prefetches cancelled once the layer's real routing was known
    bandwidths: Bandwidths | None = None
    cpu_bytes: dict[str, int] = _counter(lambda: dict.fromkeys(PHASES, 0))  # computed on the CPU (GPU runs)
    non_expert_bytes: int = 0  # resident weights every step reads (attention, norms, routers, lm_head)
    io_read_start: int | None = None  # the process's kernel-counted storage reads at attach (/proc/self/io)
    stored_expert_bytes: int = 0  # one expert as the checkpoint stores it (== expert_bytes unless quantized)
    device_format: str | None = None  # quantized checkpoints: device cache keeps "stored" or "dequantized" experts
    stored_format: str | None = None  # e.g. "fp8: FP8 e4m3 with 128x128 blocks"; None for bf16/fp16/fp32
    compute_dtype: str | None = None  # CPU: the dtype slots keep experts in when it is not the model's
    #: whether the checkpoint is read past the page cache now (O_DIRECT; a refusal switches it off mid-run)
    direct_reads_of: Callable[[], bool] | None = field(default=None, repr=False, compare=False)

    def reset(self) -> None:
        """Zero every counter in place (the fields made with ``_counter``; descriptions of the run stay)."""
        for f in fields(self):
            if f.metadata.get("counter"):
                setattr(self, f.name, f.default_factory())
        self.layers = [LayerStats(s.num_experts) for s in self.layers]
        self.io_read_start = read_proc_io()

    # -- derived -----------------------------------------------------------------------------
    @property
    def direct_reads(self) -> bool | None:
        """Experts read past the page cache (``O_DIRECT``); None where nothing is read from a checkpoint."""
        return None if self.direct_reads_of is None else bool(self.direct_reads_of())

    @property
    def hit_rate(self) -> float:
        req = sum(layer.requests for layer in self.layers)
        return sum(layer.hits["device"] for layer in self.layers) / req if req else float("nan")

    @property
    def prefetch_precision(self) -> float:
        p = sum(layer.predicted for layer in self.layers)
        return sum(layer.predicted_used for layer in self.layers) / p if p else float("nan")

    @property
    def prefetch_recall(self) -> float:
        u = sum(layer.used_when_predicted for layer in self.layers)
        return sum(layer.predicted_used for layer in self.layers) / u if u else float("nan")

    def tokens_per_s(self, phase: str) -> float:
        return self.tokens[phase] / self.seconds[phase] if self.seconds[phase] else float("nan")

    def bytes_per_token(self, phase: str = "decode") -> dict[str, float]:
        n = self.tokens[phase]
        return {t: (b / n if n else float("nan")) for t, b in self.bytes_read[phase].items()}

    @property
    def disk_bandwidth(self) -> float:
        """Measured read throughput of the checkpoint files (page cache included, as the run saw it)."""
        return self.disk_bytes_total / self.disk_read_s if self.disk_read_s else 0.0

    def decode_bound_by_resource(self) -> dict[str, float]:
        """Seconds one decode step must spend on each resource, from the bytes it moved there and the
        measured bandwidths (docs/offload.md, "A bound that can be reached"):

        - the compute device's memory streams the non-expert weights and every expert computed there, at its
          measured streaming rate (CPU: DRAM copy bandwidth, or a faster measured GEMV; GPU: device copy);
        - PCIe carries the misses copied to the GPU, DRAM the experts the CPU computes on a GPU run;
        - the disk delivers the misses read from the checkpoint.
        """
        steps = self.steps["decode"]
        if not steps or self.bandwidths is None:
            return {}
        bw = self.bandwidths
        b = {t: v / steps for t, v in self.bytes_read["decode"].items()}
        cpu = self.cpu_bytes["decode"] / steps
        disk_bw = bw.disk or self.disk_bandwidth
        stream = max(bw.dram, bw.cpu_gemv)  # no kernel streams weights faster than memory does
        if self.device == "cpu":
            load = {
                "memory": (self.non_expert_bytes + b["device"] + b["host"] + b["disk"], stream),
                "disk": (b["disk"], disk_bw),
            }
        else:
            copied = b["host"] + b["disk"] - cpu
            load = {
                "memory": (self.non_expert_bytes + b["device"] + copied, bw.device_mem),
                "pcie": (copied, bw.h2d),
                "cpu": (cpu, stream),
                "disk": (b["disk"], disk_bw),
            }
        return {r: nbytes / rate for r, (nbytes, rate) in load.items() if nbytes > 0 and rate > 0}

    def decode_bound_s(self) -> float:
        """Lower bound on one decode step: the busiest resource's time, with transfers overlapped."""
        times = self.decode_bound_by_resource()
        return max(times.values()) if times else float("nan")

    @property
    def binding_resource(self) -> str | None:
        times = self.decode_bound_by_resource()
        return max(times, key=times.get) if times else None

    def kernel_read_bytes(self) -> int | None:
        """Bytes the kernel read from storage for this process since attach (``/proc/self/io``): the
        honest count behind ``disk_bytes_total`` (readahead, page-granular reads and other files included)."""
        now = read_proc_io()
        return None if now is None or self.io_read_start is None else now - self.io_read_start

    @property
    def decode_s_per_step(self) -> float:
        return self.seconds["decode"] / self.steps["decode"] if self.steps["decode"] else float("nan")

    @property
    def fraction_of_bound(self) -> float:
        """bound / achieved: 1.0 means decode ran at the bandwidth limit."""
        t = self.decode_s_per_step
        return self.decode_bound_s() / t if t and not math.isnan(t) else float("nan")

    # -- output ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "stored_format": self.stored_format,
            "compute_dtype": self.compute_dtype,
            "device_format": self.device_format,
            "expert_bytes": self.expert_bytes,
            "stored_expert_bytes": self.stored_expert_bytes,
            "hit_rate": self.hit_rate,
            "prefill_tokens_per_s": self.tokens_per_s("prefill"),
            "decode_tokens_per_s": self.tokens_per_s("decode"),
            "decode_bytes_per_token": self.bytes_per_token("decode"),
            "stall_s": self.stall_s,
            "prefetch_precision": self.prefetch_precision,
            "prefetch_recall": self.prefetch_recall,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_cancelled": self.prefetch_dropped,
            "decode_s_per_step": self.decode_s_per_step,
            "decode_bound_s": self.decode_bound_s(),
            "decode_bound_by_resource": self.decode_bound_by_resource(),
            "fraction_of_bound": self.fraction_of_bound,
            "non_expert_bytes": self.non_expert_bytes,
            "disk_bytes_total": self.disk_bytes_total,
            "kernel_read_bytes": self.kernel_read_bytes(),
            "direct_reads": self.direct_reads,
            "bandwidths": self.bandwidths.as_dict() if self.bandwidths else None,
            "disk_bandwidth": self.disk_bandwidth,
            "layers": [
                {
                    "hit_rate": s.hit_rate,
                    "hits": dict(s.hits),
                    "cpu_computed": s.cpu_computed,
                    "load_cv": s.load_cv,
                    "precision": s.precision,
                    "recall": s.recall,
                    "slots": list(s.slots),
                }
                for s in self.layers
            ],
        }

    def __str__(self) -> str:
        def pct(x: float) -> str:
            return "-" if math.isnan(x) else f"{100 * x:.1f}%"

        lines = [
            f"moe-patch offload statistics ({self.device})",
        ]
        if self.compute_dtype:
            lines.append(f"  experts computed in {self.compute_dtype} (faster than the model's dtype on this CPU)")
        if self.stored_format:
            lines.append(
                f"  experts stored as {self.stored_format}: {format_bytes(self.stored_expert_bytes)} each "
                f"({format_bytes(self.expert_bytes)} decoded); device cache keeps them {self.device_format}"
            )

        def rate(phase: str, digits: int) -> str:
            value = self.tokens_per_s(phase)
            return "- tok/s" if math.isnan(value) else f"{value:.{digits}f} tok/s"

        lines += [
            f"  prefill: {self.tokens['prefill']} tokens, {rate('prefill', 1)} | "
            f"decode: {self.tokens['decode']} tokens, {rate('decode', 2)}",
            f"  device-cache hit rate {pct(self.hit_rate)}; stall {self.stall_s:.3f} s; "
            f"prefetch precision {pct(self.prefetch_precision)}, recall {pct(self.prefetch_recall)} "
            f"({self.prefetch_issued} issued, {self.prefetch_dropped} cancelled before reading)",
            "  decode bytes/token: "
            + ", ".join(f"{t} {format_bytes(b)}" for t, b in self.bytes_per_token().items() if not math.isnan(b)),
        ]
        kernel = self.kernel_read_bytes()
        lines.append(
            f"  disk reads{' (past the page cache)' if self.direct_reads else ''}: "
            f"{format_bytes(self.disk_bytes_total)} requested"
            + (f", {format_bytes(kernel)} counted by the kernel for the process" if kernel is not None else "")
        )
        bound = self.decode_bound_s()
        if not math.isnan(bound):
            parts = ", ".join(f"{r} {1e3 * t:.1f} ms" for r, t in self.decode_bound_by_resource().items())
            lines.append(
                f"  decode {1e3 * self.decode_s_per_step:.1f} ms/step vs bound {1e3 * bound:.1f} ms "
                f"({pct(self.fraction_of_bound)} of the bound; {parts}; {self.binding_resource} binds)"
            )
        lines.append("  layer  hit-rate  device/host/disk  cpu  load-CV  prefetch P/R")
        for i, s in enumerate(self.layers):
            lines.append(
                f"  {i:>5}  {pct(s.hit_rate):>8}  {s.hits['device']}/{s.hits['host']}/{s.hits['disk']:<8}"
                f"  {s.cpu_computed:>3}  {s.load_cv:7.2f}  {pct(s.precision)}/{pct(s.recall)}"
            )
        return "\n".join(lines)

    def plot_utilisation(self, path: str) -> str:
        """Write a PNG heatmap of routed slots per expert and layer (atomically); needs matplotlib."""
        from ..plotting import pyplot, save_png

        plt = pyplot()
        width = max(s.num_experts for s in self.layers)
        grid = [[(s.slots[e] if e < s.num_experts else float("nan")) for e in range(width)] for s in self.layers]
        fig, ax = plt.subplots(figsize=(max(4, width / 8), max(2.5, len(grid) / 4)))
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(grid)))
        if width <= 32:
            ax.set_xticks(range(width))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title("expert utilisation (routed token slots)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        return str(save_png(fig, path))
