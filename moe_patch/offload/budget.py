"""Memory budgets: parse ``"8GiB"``-style sizes and check them against the smallest useful size.

Budgets are hard limits on the bytes an expert cache may hold; everything here is pure.
"""

from __future__ import annotations

import math

import re

from ..errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str | None, *, name: str = "budget") -> int | None:
    """``8GiB`` / ``"512MB"`` / ``1_000_000`` -> bytes; ``None`` (no limit) stays ``None``.

    Binary units (KiB, MiB, GiB, TiB, and the short K/M/G/T) are powers of 1024, decimal units
    (KB, MB, GB, TB) powers of 1000, as in huggingface_hub and accelerate.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BudgetError(f"{name}: expected a size such as 8GiB or a number of bytes, got {value!r}.")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise BudgetError(f"{name}: a budget must be a finite, non-negative size (got {value}).")
        return int(value)
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise BudgetError(
            f"{name}: cannot read {value!r} as a size; write e.g. '8GiB', '512MB' or a number of bytes."
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_budget(budget: int | None, expert_bytes: int, *, name: str, allow_zero: bool) -> None:
    """Raise :class:`BudgetError` when ``budget`` cannot hold the largest expert.

    ``allow_zero``: the tier may be switched off entirely with a budget of 0 (the host tier may; the
    device tier may not, since every expert must be computed from it).
    """
    if budget is None or (allow_zero and budget == 0):
        return
    if budget < expert_bytes:
        raise BudgetError(
            f"{name}={format_bytes(budget)} ({budget} bytes) is smaller than one expert: the minimum is "
            f"{format_bytes(expert_bytes)} ({expert_bytes} bytes)"
            + (" (or 0 to switch this tier off)" if allow_zero else "")
            + ". Raise the budget, or quantize the experts (quantize_experts='nf4') to shrink them."
        )
