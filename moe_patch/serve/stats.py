"""Offload figures of each generation and their running totals: the server's ``GET /stats`` and chat's ``!stats``.

Totals add up the counts behind the figures (tokens, seconds, bytes, cache hits, bandwidth-bound time) and divide
at the end, so a long generation weighs more than a short one; one generation's figures are the totals of that
generation alone, so both come from the same code.

`moe-patch chat` runs one generation at a time: its figures are the engine's own counters between a
``reset_stats()`` right before it and the read right after it (:class:`StatsBook`). The server decodes several
requests in one batch, so nothing can be reset per request: :class:`EngineMeter` reads what the engine counted
during each forward pass, the server's totals add every pass once, and each request's figures add the passes it
took part in (a pass shared by four requests counts for each of them, with its four tokens: the rates are those
the request saw; its own token counts and times are in its record).
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

    def plus(self, other: Totals) -> Totals:
        """Add ``other``'s counts (a forward pass's, from :class:`EngineMeter`) to these."""
        self.generations += other.generations
        for phase in PHASES:
            self.tokens[phase] += other.tokens[phase]
            self.seconds[phase] += other.seconds[phase]
        for mine, theirs in ((self.decode_bytes, other.decode_bytes), (self.hits, other.hits)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + n
        self.bound_s += other.bound_s
        self.bounded_decode_s += other.bounded_decode_s
        self.stall_s += other.stall_s
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
    return (
        f"{fig['decode_tokens']} decode tokens at {rate(fig['decode_tokens_per_s'], 2)}, prefill "
        f"{rate(fig['prefill_tokens_per_s'], 1)}; device-cache hit rate {pct(fig['hit_rate'])}; "
        f"decode bytes/token {per_token or '-'}; {pct(fig['fraction_of_bound'])} of the bandwidth bound"
    )


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
            record = GenerationRecord(
                ticket.request_id,
                started_at,
                time.time(),
                started - ticket.submitted,
                time.monotonic() - started,
                ticket.prompt_tokens,
                figures(stats),
            )
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
            return json_safe(
                {
                    "scheduling": "one generation at a time on the offload engine, first come first served",
                    "waiting": self._waiting,
                    "running": self._running,
                    "cumulative": self._totals.figures(),
                    "requests": [asdict(r) for r in self._records],
                    "last_engine_report": self._last.to_dict() if self._last is not None else None,
                }
            )


class EngineMeter:
    """What the offload engine counted since the previous :meth:`delta` (one forward pass, when called after each),
    as :class:`Totals`. Read on the thread that runs the model, between passes."""

    def __init__(self, handle: OffloadHandle | None):
        self._handle = handle
        self._last, self._last_steps = self._counts()

    def _counts(self) -> tuple[Totals, int]:
        if self._handle is None:
            return Totals(), 0
        stats, out = self._handle.stats, Totals()
        out.tokens, out.seconds = dict(stats.tokens), dict(stats.seconds)
        out.decode_bytes = dict(stats.bytes_read["decode"])
        for layer in stats.layers:
            for tier, n in layer.hits.items():
                out.hits[tier] = out.hits.get(tier, 0) + n
        out.stall_s = stats.stall_s
        return out, stats.steps["decode"]

    def delta(self) -> Totals:
        now, steps = self._counts()
        last, out = self._last, Totals()
        for phase in PHASES:
            out.tokens[phase] = now.tokens[phase] - last.tokens[phase]
            out.seconds[phase] = now.seconds[phase] - last.seconds[phase]
        for mine, new, old in (
            (out.decode_bytes, now.decode_bytes, last.decode_bytes),
            (out.hits, now.hits, last.hits),
        ):
            for key, n in new.items():
                mine[key] = n - old.get(key, 0)
        out.stall_s = now.stall_s - last.stall_s
        passes = steps - self._last_steps
        if passes and self._handle is not None:
            per_step = self._handle.stats.decode_bound_s()  # the bound per decode step, from everything so far
            if math.isfinite(per_step):
                out.bound_s, out.bounded_decode_s = per_step * passes, out.seconds["decode"]
        self._last, self._last_steps = now, steps
        return out


@dataclass
class RequestRecord:
    """One request the server answered (``GET /stats``' ``requests``)."""

    request_id: str
    started_at: float  # Unix time its prefill began
    finished_at: float
    queued_s: float  # from its arrival at the engine to its prefill
    wall_s: float  # from its prefill to its last token
    time_to_first_token_s: float | None  # from its arrival at the engine
    prompt_tokens: int
    cached_prompt_tokens: int  # of them, taken from the prompt cache instead of computed
    completion_tokens: int
    finish_reason: str
    path: str  # "batched" (the step loop) or "generate" (transformers' generate(), alone)
    mean_batch: float | None  # requests per decode pass it took part in, on average
    offload: dict[str, Any]  # figures of the forward passes it took part in


class ServerBook:
    """The server's totals and its last ``keep`` requests; written by the engine's thread, read by the HTTP ones."""

    def __init__(self, keep: int = 100):
        self._lock = threading.Lock()
        self._records: deque[RequestRecord] = deque(maxlen=keep)
        self._totals = Totals()
        self._counts = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0}
        self._engine_report: dict[str, Any] | None = None

    def add_pass(self, delta: Totals) -> None:
        with self._lock:
            self._totals.plus(delta)

    def finished(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._totals.generations += 1
            self._counts["requests"] += 1
            self._counts["prompt_tokens"] += record.prompt_tokens
            self._counts["cached_prompt_tokens"] += record.cached_prompt_tokens
            self._counts["completion_tokens"] += record.completion_tokens

    def set_engine_report(self, report: dict[str, Any] | None) -> None:
        with self._lock:
            self._engine_report = report

    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            counts["cached_prompt_fraction"] = _ratio(counts["cached_prompt_tokens"], counts["prompt_tokens"])
            return json_safe(
                {
                    "cumulative": {**self._totals.figures(), **counts},
                    "requests": [asdict(r) for r in self._records],
                    "engine_report": self._engine_report,
                }
            )
