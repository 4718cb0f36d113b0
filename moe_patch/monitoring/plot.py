"""PNG of a routing report: expert load per layer, and load balance per step when there is a history.

matplotlib is optional (``pip install matplotlib``); the file is written atomically (``moe_patch.atomic``).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..plotting import pyplot, save_png
from .stats import RoutingReport


def relative_load(report: RoutingReport) -> list[list[float]]:
    """Per layer, each routed expert's load over the layer's mean load (1 = balanced); NaN-padded."""
    width = max((lr.counts.num_experts for lr in report.layers), default=0)
    grid = []
    for lr in report.layers:
        load = lr.counts.load
        total = sum(load)
        row = [v * len(load) / total if total else math.nan for v in load]
        grid.append(row + [math.nan] * (width - len(row)))
    return grid


def plot_routing(report: RoutingReport, history: list[RoutingReport], path: Path) -> Path:
    plt = pyplot()
    grid = relative_load(report)
    curve = len(history) >= 2
    width = len(grid[0]) if grid else 1
    fig, axes = plt.subplots(
        1,
        2 if curve else 1,
        figsize=(max(5.0, width / 6) + (6 if curve else 0), max(3.0, len(grid) / 4)),
        squeeze=False,
    )
    ax = axes[0][0]
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    if width <= 32:
        ax.set_xticks(range(width))
    ax.set_yticks(range(0, len(grid), max(1, len(grid) // 24)))
    ax.set_title(f"load / mean load ({report.tokens} tokens per layer)")
    fig.colorbar(im, ax=ax)
    if curve:
        ax = axes[0][1]
        steps = [r.step if r.step is not None else i for i, r in enumerate(history)]
        per_layer = list(zip(*[r.figure("load_cv") for r in history]))
        for values in per_layer:
            ax.plot(steps, values, color="0.7", linewidth=0.8)
        ax.plot(
            steps,
            [max((v for v in r.figure("load_cv") if not math.isnan(v)), default=math.nan) for r in history],
            color="C3",
            linewidth=1.6,
            label="worst layer",
        )
        ax.set_xlabel("step")
        ax.set_ylabel("load CV (0 = balanced)")
        ax.set_title("load balance per window")
        ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
