"""Timing what a machine keeps: the shortest of alternating rounds (used by every per-machine calibration)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def best_seconds(*fns: Callable[[], object], repeats: int = 5, warmup: bool = True) -> tuple[float, ...]:
    """The shortest wall time of each of ``fns`` over ``repeats`` rounds that call them in turn.

    What is measured here is kept for the machine, so a busy moment must not decide for every later process:
    other work only ever adds time, so the minimum is the machine's own speed, and contenders timed in
    alternation see the same moments (a medians-of-blocks comparison measured once bf16 GEMV at a tenth of
    fp32's on a CPU with native bf16, because the bf16 block ran while another job did)."""
    if warmup:
        for fn in fns:
            fn()
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return tuple(best)
