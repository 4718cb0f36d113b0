"""What is fastest on the running machine, measured once and kept (per machine, in a small JSON file).

Which kernel wins depends on the CPU: a bf16 GEMM runs natively on AVX512_BF16/AMX and several times
slower than fp32 on AVX2-only CPUs, where casting a half-precision expert to fp32 pays off once it has
enough rows. Nothing here is a constant tuned on one machine: :func:`upcast_min_rows` times both on a
representative expert the first time a question is asked on a machine, and the answer is stored in
``$MOE_PATCH_CACHE`` (default ``~/.cache/moe_patch``) under a fingerprint of the CPU, torch and the
thread count, so later processes on the same machine do not measure again.

:data:`CALIBRATIONS` is the explicit registry of these answers (the only mutable state of the dispatch).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..timing import best_seconds

logger = logging.getLogger(__name__)


def machine_fingerprint() -> str:
    """The CPU model and flags, torch's version and build, and the intra-op thread count, hashed."""
    return _fingerprint(torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _fingerprint(threads: int) -> str:
    # read once per process and thread count: the dispatch asks on every call
    cpu = platform.processor() or ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("flags")), "")
        cpu = f"{model}|{flags}"
    except OSError:
        pass
    text = f"{platform.machine()}|{cpu}|{torch.__version__}|{threads}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Calibrations:
    """Measured answers keyed by question, per machine; kept in memory and in one JSON file per machine.

    An answer is a number (:meth:`get`) or a record of named numbers (:meth:`record`: the offload cost model's
    bandwidths, measured together)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory or os.environ.get("MOE_PATCH_CACHE") or "~/.cache/moe_patch").expanduser()
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, Any]] = {}  # fingerprint -> question -> answer

    def _file(self, fingerprint: str) -> Path:
        return self.directory / f"calibration-{fingerprint}.json"

    def _load(self, fingerprint: str) -> dict[str, Any]:
        values = self._values.get(fingerprint)
        if values is None:
            try:
                values = json.loads(self._file(fingerprint).read_text())
            except (OSError, ValueError):
                values = {}
            if not isinstance(values, dict):
                values = {}
            self._values[fingerprint] = values
        return values

    def _answer(self, question: str, measure: Callable[[], Any], valid: Callable[[Any], bool]) -> Any:
        fingerprint = machine_fingerprint()
        known = self._values.get(fingerprint)
        if known is not None and question in known and valid(known[question]):  # the hot path: no lock, no I/O
            return known[question]
        with self._lock:
            values = self._load(fingerprint)
            if question in values and valid(values[question]):
                return values[question]
            t0 = time.perf_counter()
            answer = measure()
            values[question] = answer
            shown = f" = {answer}" if isinstance(answer, float) else ""  # a record: its figures are in the file
            logger.info(
                "calibrated %s%s in %.2f s (kept in %s)",
                question,
                shown,
                time.perf_counter() - t0,
                self._file(fingerprint),
            )
            self._store(fingerprint, values)
            return answer

    def get(self, question: str, measure: Callable[[], float]) -> float:
        """The answer to ``question`` on this machine: stored, or measured now (and stored)."""
        return self._answer(question, lambda: float(measure()), lambda v: isinstance(v, (int, float)))

    def record(self, question: str, fields: Sequence[str], measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        """A record of named numbers (``fields``, all present) answering ``question`` on this machine: stored, or
        measured now (and stored). A stored record missing a field (an older version's) is measured again."""

        def valid(value: Any) -> bool:
            return isinstance(value, dict) and all(isinstance(value.get(f), (int, float)) for f in fields)

        return dict(self._answer(question, lambda: {f: float(v) for f, v in measure().items()}, valid))

    def _store(self, fingerprint: str, values: dict[str, float]) -> None:
        # best effort and atomic: a read-only home only means measuring again in the next process
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self._file(fingerprint).with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(values, indent=2))
            os.replace(tmp, self._file(fingerprint))
        except OSError as exc:
            logger.debug("could not store calibrations in %s: %s", self.directory, exc)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


CALIBRATIONS = Calibrations()


def _measure_upcast_min_rows(dtype: torch.dtype) -> float:
    """Smallest row count at which ``F.linear`` on one expert-sized matrix cast to fp32 beats it in ``dtype``."""
    out_features, in_features = 1536, 1024  # a gate/up projection of a mid-sized expert (Qwen3-30B-A3B: 1536 x 2048)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=gen).to(dtype)
    for rows in (1, 4, 16, 64, 256):
        x = torch.randn(rows, in_features, generator=gen).to(dtype)
        native, upcast = best_seconds(lambda x=x: F.linear(x, w), lambda x=x: F.linear(x.float(), w.float()))
        if upcast < 0.9 * native:  # a clear win only: near parity, stay in the model's dtype
            return float(rows)
    return math.inf


def upcast_min_rows(dtype: torch.dtype) -> float:
    """Rows per expert from which computing a half-precision expert in fp32 (its weights cast on the fly)
    is faster than computing it in its own ``dtype`` on this CPU; ``inf`` where it never is."""
    if dtype not in (torch.bfloat16, torch.float16):
        return math.inf
    return CALIBRATIONS.get(
        f"cpu_upcast_min_rows/{str(dtype).removeprefix('torch.')}", lambda: _measure_upcast_min_rows(dtype)
    )


#: rows per expert at which loop and grouped GEMM are timed against each other
LOOP_BUCKETS = (1, 4, 16, 64, 256)


def _measure_loop_wins(dtype: torch.dtype) -> float:
    """For each row count of :data:`LOOP_BUCKETS`, whether a loop of per-expert ``F.linear`` beats one
    grouped GEMM over the same experts (a bit per bucket; the crossover is not always monotonic: a CPU
    GEMM kernel may win at a few rows and lose at many)."""
    from .core import _grouped_mm

    experts, out_features, in_features = 8, 2048, 1024
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(experts, out_features, in_features, generator=gen).to(dtype)
    wt = w.transpose(-2, -1)
    bits = 0
    for i, rows in enumerate(LOOP_BUCKETS):
        x = torch.randn(experts * rows, in_features, generator=gen).to(dtype)
        offs = torch.arange(1, experts + 1, dtype=torch.int32) * rows
        try:
            _grouped_mm(x, wt, offs)
        except RuntimeError:  # no grouped kernel for this dtype here: the loop always
            return float(2 ** len(LOOP_BUCKETS) - 1)
        grouped, loop = best_seconds(
            lambda x=x, offs=offs: _grouped_mm(x, wt, offs),
            lambda x=x, rows=rows: [F.linear(x[e * rows : (e + 1) * rows], w[e]) for e in range(experts)],
        )
        if loop < 0.95 * grouped:
            bits |= 1 << i
    return float(bits)


def loop_wins(dtype: torch.dtype, rows_per_expert: float) -> bool:
    """Whether, on this machine's CPU, a loop over the active experts beats one grouped GEMM at this many
    rows each (the nearest measured bucket)."""
    bits = int(
        CALIBRATIONS.get(f"cpu_loop_wins/{str(dtype).removeprefix('torch.')}", lambda: _measure_loop_wins(dtype))
    )
    nearest = min(
        range(len(LOOP_BUCKETS)), key=lambda i: abs(math.log2(LOOP_BUCKETS[i]) - math.log2(max(rows_per_expert, 1)))
    )
    return bool(bits >> nearest & 1)
