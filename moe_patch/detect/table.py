"""Plain-text rendering of a :class:`~moe_patch.detect.spec.MoEReport` (which imports this module: none back)."""

from __future__ import annotations

from typing import Any

from ..sizes import format_bytes as human_bytes  # the one byte formatter (planner.py imports it from here)


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_report(report: Any) -> str:
    lines = [f"{report.model_class} ({report.family or 'unknown family'})"]
    if not report.blocks:
        lines.append("  no Mixture-of-Experts block found")
        return "\n".join(lines)
    header = ("block", "experts", "top-k", "hidden", "inter", "routing", "layout", "adapter")
    rows = [header]
    for b in report.blocks:
        rows.append(
            (
                b.experts_path,
                str(b.num_experts),
                str(b.top_k),
                str(b.hidden_size),
                str(b.intermediate_size),
                b.routing.describe(),
                b.layout.flags(),
                b.adapter,
            )
        )
    # Many identical layers: show the first two and the last, say how many were folded.
    if len(rows) > 7:
        folded = len(rows) - 4
        rows = rows[:3] + [(f"... {folded} more blocks", "", "", "", "", "", "", "")] + rows[-1:]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    shared = sum(b.shared_params for b in report.blocks)
    lines.append(
        f"  {len(report.blocks)} MoE blocks | params total {human_count(report.total_params)}, "
        f"active/token {human_count(report.active_params)} "
        f"({100 * report.active_params / max(report.total_params, 1):.1f}%), "
        f"routed experts {human_count(report.routed_expert_params)}, shared experts {human_count(shared)}"
    )
    lines.append("  weights: " + ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(report.bytes_by_dtype.items())))
    return "\n".join(lines)
