"""How moe-patch compares outputs with the Hugging Face reference."""

from __future__ import annotations

import torch


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64: the tolerance measure of the issues and docs."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))
