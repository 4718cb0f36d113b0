"""Offload figures of each generation and their running totals: the server's ``GET /stats`` and chat's ``!stats``.

Generations run one at a time on the engine (``generation.py``), so a generation's figures are the
engine's own counters between a ``reset_stats()`` right before it and the read right after it. Totals
add up the counts behind the figures (tokens, seconds, bytes, cache hits, bandwidth-bound time) and
divide at the end, so a long generation weighs more than a short one; one generation's figures are the
totals of that generation alone, so both come from the same code.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..sizes import format_bytes

if TYPE_CHECKING:
    from ..offload import OffloadHandle, OffloadStats

PHASES = ("prefill", "decode")


def json_safe(value: Any) -> Any:
    """``value`` with NaN / infinity replaced by None (JSON has no NaN; an undefined rate is null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


@dataclass
class Totals:
    """Counts summed over generations (``add``) and the figures they give (``figures``)."""

    generations: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    decode_bytes: dict[str, float] = field(default_factory=dict)  # per tier: device / host / disk
    hits: dict[str, int] = field(default_factory=dict)  # expert uses served by each tier
    bound_s: float = 0.0  # decode time the bandwidth bound allows, summed over generations that have one
    bounded_decode_s: float = 0.0  # the decode time those generations took
    stall_s: float = 0.0

    def add(self, stats: OffloadStats) -> Totals:
        self.generations += 1
        for phase in PHASES:
            self.tokens[phase] += stats.tokens[phase]
            self.seconds[phase] += stats.seconds[phase]
        for tier, n in stats.bytes_read["decode"].items():
            self.decode_bytes[tier] = self.decode_bytes.get(tier, 0) + n
        for layer in stats.layers:
            for tier, n in layer.hits.items():
                self.hits[tier] = self.hits.get(tier, 0) + n
        per_step = stats.decode_bound_s()
        if math.isfinite(per_step) and stats.steps["decode"]:
            self.bound_s += per_step * stats.steps["decode"]
            self.bounded_decode_s += stats.seconds["decode"]
        self.stall_s += stats.stall_s
        return self

    def figures(self) -> dict[str, Any]:
        """tok/s per phase, device-cache hit rate, decode bytes per token per tier, fraction of the bound
        (bound / achieved: 1.0 = decode ran at the bandwidth limit)."""
        return {
            "generations": self.generations,
            "prefill_tokens": self.tokens["prefill"],
            "decode_tokens": self.tokens["decode"],
            "prefill_tokens_per_s": _ratio(self.tokens["prefill"], self.seconds["prefill"]),
            "decode_tokens_per_s": _ratio(self.tokens["decode"], self.seconds["decode"]),
            "hit_rate": _ratio(self.hits.get("device", 0), sum(self.hits.values())),
            "decode_bytes_per_token": {t: _ratio(b, self.tokens["decode"]) for t, b in self.decode_bytes.items()},
            "fraction_of_bound": _ratio(self.bound_s, self.bounded_decode_s),
            "stall_s": self.stall_s,
        }


def figures(stats: OffloadStats) -> dict[str, Any]:
    """The figures of one engine report (the totals of that report alone)."""
    return Totals().add(stats).figures()


def summary(fig: dict[str, Any]) -> str:
    """One line of figures, for a terminal."""

    def known(x: float | None) -> bool:
        return x is not None and not math.isnan(x)

    def rate(x: float | None, digits: int) -> str:
        return f"{x:.{digits}f} tok/s" if known(x) else "- tok/s"

    def pct(x: float | None) -> str:
        return f"{100 * x:.1f}%" if known(x) else "-"

    per_token = ", ".join(f"{t} {format_bytes(b)}" for t, b in fig["decode_bytes_per_token"].items() if known(b))
    return (f"{fig['decode_tokens']} decode tokens at {rate(fig['decode_tokens_per_s'], 2)}, prefill "
            f"{rate(fig['prefill_tokens_per_s'], 1)}; device-cache hit rate {pct(fig['hit_rate'])}; "
            f"decode bytes/token {per_token or '-'}; {pct(fig['fraction_of_bound'])} of the bandwidth bound")


@dataclass
class Ticket:
    """A generation waiting for the engine."""

    request_id: str | None
    prompt_tokens: int | None
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class GenerationRecord:
    request_id: str | None
    started_at: float  # Unix time
    finished_at: float
    queued_s: float
    wall_s: float
    prompt_tokens: int | None
    offload: dict[str, Any]


class StatsBook:
    """Records every generation run through :meth:`measure`; thread-safe (generations are measured on the
    inference thread, read from the HTTP handlers). Keeps the last ``keep`` records and the totals."""

    def __init__(self, handle: OffloadHandle, keep: int = 100):
        self._handle = handle
        self._lock = threading.Lock()
        self._records: deque[GenerationRecord] = deque(maxlen=keep)
        self._totals = Totals()
        self._last: OffloadStats | None = None
        self._waiting = 0
        self._running: str | None = None

    def enqueue(self, request_id: str | None = None, prompt_tokens: int | None = None) -> Ticket:
        with self._lock:
            self._waiting += 1
        return Ticket(request_id, prompt_tokens)

    def measure(self, ticket: Ticket, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` with the engine's counters reset before it, and record what they counted."""
        started, started_at = time.monotonic(), time.time()
        with self._lock:
            self._waiting -= 1
            self._running = ticket.request_id or "(unnamed)"
        self._handle.reset_stats()
        try:
            return fn(*args, **kwargs)
        finally:
            stats = self._handle.stats
            record = GenerationRecord(ticket.request_id, started_at, time.time(), started - ticket.submitted,
                                      time.monotonic() - started, ticket.prompt_tokens, figures(stats))
            with self._lock:
                self._records.append(record)
                self._totals.add(stats)
                self._last = stats
                self._running = None

    @property
    def last(self) -> OffloadStats | None:
        """The engine's full report of the last generation."""
        return self._last

    def records(self) -> list[GenerationRecord]:
        with self._lock:
            return list(self._records)

    def cumulative(self) -> dict[str, Any]:
        with self._lock:
            return self._totals.figures()

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return json_safe({
                "scheduling": "one generation at a time on the offload engine, first come first served",
                "waiting": self._waiting,
                "running": self._running,
                "cumulative": self._totals.figures(),
                "requests": [asdict(r) for r in self._records],
                "last_engine_report": self._last.to_dict() if self._last is not None else None,
            })
