"""The figures a routing report shows, and its plain-text rendering (of a
:class:`~moe_patch.monitoring.stats.RoutingReport`, which imports this module: none back)."""

from __future__ import annotations

import math
from typing import Any

#: The figures of one layer, in table and log order: (key, LayerCounts property, short column title).
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("load_cv", "load_cv", "load CV"),
    ("max_over_mean", "max_over_mean", "max/mean"),
    ("idle_share", "idle_share", "idle"),
    ("weight_mass", "weight_mass", "w-mass"),
    ("topk_prob_mass", "topk_prob_mass", "p(top-k)"),
    ("entropy", "normalized_entropy", "entropy"),
    ("z_loss", "z_loss", "z-loss"),
    ("dropped_slots", "dropped_slot_share", "dropped"),
    ("top1_changed", "", "top-1 changed"),
)


def _cell(key: str, value: float) -> str:
    if math.isnan(value):
        return "-"
    if key in ("idle_share", "dropped_slots", "top1_changed"):
        return f"{100 * value:.1f}%"
    return f"{value:.3f}" if key in ("weight_mass", "topk_prob_mass", "entropy") else f"{value:.2f}"


def format_routing(report: Any) -> str:
    """The table of a :class:`~moe_patch.monitoring.stats.RoutingReport`."""
    lines = [
        f"routing over {report.calls} forward calls, {report.tokens} tokens per layer"
        + (f" (step {report.step})" if report.step is not None else "")
    ]
    header = ("layer", "tokens") + tuple(title for _, _, title in FIGURES) + ("non-finite",)
    rows = [header]
    for lr in report.layers:
        figures = lr.figures()
        rows.append(
            (lr.counts.path, str(lr.counts.tokens))
            + tuple(_cell(k, figures[k]) for k, _, _ in FIGURES)
            + (str(lr.counts.nonfinite + lr.counts.invalid),)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines.append(
        "  load CV: std/mean of tokens per expert (0 = balanced); entropy: over log(E); "
        "w-mass: summed top-k weights; p(top-k): router probability on the chosen experts"
    )
    lines += [f"  not watched {path}: {why}" for path, why in report.skipped.items()]
    return "\n".join(lines)
