"""Memory budgets: parse ``"8GiB"``-style sizes and check them against the smallest useful size.

Budgets are hard limits on the bytes an expert cache may hold; everything here is pure.
"""

from __future__ import annotations

from ..errors import BudgetError
from ..sizes import format_bytes, parse_size

__all__ = ["check_budget", "format_bytes", "parse_bytes"]


def parse_bytes(value: int | float | str | None, *, name: str = "budget") -> int | None:
    """``8GiB`` / ``"512MB"`` / ``1_000_000`` -> bytes; ``None`` (no limit) stays ``None``.

    The package's one size parser (:func:`moe_patch.sizes.parse_size`): KB, MB, GB, TB are powers of
    1000, KiB, MiB, GiB, TiB and the short K, M, G, T powers of 1024. Errors are :class:`BudgetError`.
    """
    return None if value is None else parse_size(value, name=name, error=BudgetError)


#: The command line's flag for each budget argument (error messages name the one the user typed).
FLAGS = {"expert_cache": "--expert-cache", "host_cache": "--host-cache"}


def check_budget(budget: int | None, expert_bytes: int, *, name: str, allow_zero: bool) -> None:
    """Raise :class:`BudgetError` when ``budget`` cannot hold the largest expert.

    ``allow_zero``: the tier may be switched off entirely with a budget of 0 (the host tier may; the
    device tier may not, since every expert must be computed from it).
    """
    if budget is None or (allow_zero and budget == 0):
        return
    if budget < expert_bytes:

        def message(option: str, quantize: str) -> str:
            return (
                f"{option}={format_bytes(budget)} ({budget} bytes) is smaller than one expert: the minimum is "
                f"{format_bytes(expert_bytes)} ({expert_bytes} bytes)"
                + (" (or 0 to switch this tier off)" if allow_zero else "")
                + f". Raise the budget, or quantize the experts ({quantize}) to shrink them."
            )

        raise BudgetError(
            message(name, "quantize_experts='nf4'"), cli_message=message(FLAGS.get(name, name), "--quantize nf4")
        )
