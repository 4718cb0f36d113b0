"""What the kernels beat on this machine: rows per expert from which decoding an expert densely and running torch's
GEMM beats the fused kernel, the kernel's streaming rate per format, and up to how many rows, and from what
weight size, its GEMV beats torch's ``F.linear`` on a dense weight.

The kernel decodes each weight once per call and multiplies it with every row routed to its expert from
registers (up to 8 rows) or from a per-thread L1/L2 buffer (more), with the CPU's bf16 dot product. At
prefill row counts a tuned GEMM (oneDNN through torch, AMX where the CPU has it) may be faster, paying one
dense decode of the expert. Which wins depends on the CPU, the thread count and the format, so it is timed
once per machine on a representative expert and kept in ``$MOE_PATCH_KERNEL_CACHE`` (a JSON file per CPU,
torch version and thread count). :data:`CROSSOVERS` is the explicit registry of these answers.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time

import torch
import torch.nn.functional as F

from ..atomic import write_bytes
from ..timing import best_seconds
from .build import cache_root
from .probe import cpu_fingerprint

logger = logging.getLogger(__name__)

#: rows per expert at which the two are timed against each other
ROW_BUCKETS = (16, 64, 256)
#: rows at which the kernels' GEMV and ``F.linear`` are timed against each other
LINEAR_ROWS = (1, 2, 4, 8, 16)
#: weight sizes (bytes) at which the two are timed at one row: below some size a call's fixed costs, not the
#: weight's bytes, set the time, and which side's are lower depends on the machine and torch's build
LINEAR_BYTES = (64 << 10, 256 << 10, 1 << 20)
#: side of the square weights the row counts are timed on (a decode step's attention projections)
LINEAR_SIDE = 2048


def measure_gemm_min_rows(kind: str, compute: torch.dtype) -> float:
    """Smallest of :data:`ROW_BUCKETS` at which decode + torch GEMM is clearly (10%) faster than the kernel
    for one expert of a mid-sized shape (Qwen3-30B-A3B: hidden 2048, intermediate 768) stored as ``kind``;
    ``inf`` where it never is."""
    from .layer import MoEKernel
    from .spec import ExpertFormat, ExpertWeights, MoELayerSpec

    hidden, inter = 2048, 768
    gen = torch.Generator().manual_seed(0)
    fmt = {
        "fp8": ExpertFormat("fp8", block=(128, 128)),
        "mxfp4": ExpertFormat("mxfp4"),
        "int4": ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16),
        "int8": ExpertFormat("int8", scale_dtype=torch.bfloat16),
    }.get(kind, ExpertFormat(kind))
    layer = MoEKernel(MoELayerSpec(1, hidden, inter, fmt, fmt), gemm_min_rows=None)  # the kernel alone
    layer.set_expert(0, ExpertWeights(*_random_expert(fmt, hidden, inter, gen)))
    wg = torch.empty(2 * inter, hidden, dtype=compute)
    wd = torch.empty(hidden, inter, dtype=compute)

    def gemm(x: torch.Tensor) -> None:
        layer.decode(0, "gate_up", compute, wg)
        layer.decode(0, "down", compute, wd)
        gate, up = F.linear(x, wg).chunk(2, dim=-1)
        F.linear(F.silu(gate) * up, wd)

    for rows in ROW_BUCKETS:
        x = torch.randn(rows, hidden, generator=gen).to(compute)
        idx = torch.zeros(rows, 1, dtype=torch.int64)
        wts = torch.ones(rows, 1)
        out = torch.empty(rows, hidden, dtype=compute)
        fused, dense = best_seconds(functools.partial(layer.forward, x, idx, wts, out), functools.partial(gemm, x))
        if dense < 0.9 * fused:
            return float(rows)
    return math.inf


def measure_stream_rate(kind: str, compute: torch.dtype, total_bytes: int = 96 * 2**20) -> float:
    """Stored bytes per second the kernel streams at one row from DRAM for experts stored as ``kind``
    (``compute``: the activations' dtype): one call over enough experts of a mid-sized shape (hidden 2048,
    intermediate 768) that they do not fit a cache, median of 3 after a warm-up."""
    from .layer import MoEKernel
    from .spec import ExpertFormat, ExpertWeights, MoELayerSpec

    hidden, inter = 2048, 768
    gen = torch.Generator().manual_seed(0)
    fmt = {
        "fp8": ExpertFormat("fp8", block=(128, 128)),
        "mxfp4": ExpertFormat("mxfp4"),
        "int4": ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16),
        "int8": ExpertFormat("int8", scale_dtype=torch.bfloat16),
    }.get(kind, ExpertFormat(kind))
    one = _random_expert(fmt, hidden, inter, gen)
    per_expert = sum(t.numel() * t.element_size() for t in one if t is not None)
    experts = max(2, total_bytes // per_expert)
    layer = MoEKernel(MoELayerSpec(experts, hidden, inter, fmt, fmt), gemm_min_rows=None)
    keep = []
    for e in range(experts):
        w = one if e == 0 else _random_expert(fmt, hidden, inter, gen)
        keep.append(w)
        layer.set_expert(e, ExpertWeights(*w))
    x = torch.randn(1, hidden, generator=gen).to(compute)
    idx = torch.arange(experts, dtype=torch.int64).unsqueeze(0)
    wts = torch.ones(1, experts)
    out = torch.empty(1, hidden, dtype=compute)
    return experts * per_expert / best_seconds(functools.partial(layer.forward, x, idx, wts, out), repeats=3)[0]


def _gemv_wins(kernels: list, weights: list[torch.Tensor], x: torch.Tensor) -> bool:
    """Whether the kernels' GEMV over ``kernels`` is clearly (5%) faster than ``F.linear`` over the same
    ``weights`` (called in turn) on ``x``."""
    with torch.no_grad():
        gemv, torch_s = best_seconds(lambda: [k(x) for k in kernels], lambda: [F.linear(x, w) for w in weights])
    return gemv < 0.95 * torch_s


def measure_linear_max_rows(dtype: torch.dtype) -> float:
    """The largest of :data:`LINEAR_ROWS` up to which (at every count) the kernels' GEMV is clearly (5%) faster than
    ``F.linear`` on dense ``dtype`` weights that stream from DRAM (a decode step's attention and lm_head: 64 MiB of
    2048 x 2048 bf16 matrices, called in turn); 0 where it never is."""
    from .linear import LinearKernel

    gen = torch.Generator().manual_seed(0)
    side = LINEAR_SIDE
    count = max(2, (64 * 2**20) // (side * side * torch.empty(0, dtype=dtype).element_size()))
    weights = [(torch.randn(side, side, generator=gen) * 0.02).to(dtype) for _ in range(count)]
    kernels = [LinearKernel(w) for w in weights]
    best = 0.0
    for rows in LINEAR_ROWS:
        if not _gemv_wins(kernels, weights, torch.randn(rows, side, generator=gen).to(dtype)):
            break
        best = float(rows)
    return best


def measure_linear_min_bytes(dtype: torch.dtype) -> float:
    """The smallest of :data:`LINEAR_BYTES` from which (at that size and every larger one) the kernels' GEMV is
    clearly (5%) faster than ``F.linear`` at one row, on 64 MiB of weights of that size called in turn (a decode
    step's small projections: attention of a narrow model, shared experts). Where it is at none, the size the row
    counts are measured on (:data:`LINEAR_SIDE` squared): larger weights are left to that measurement."""
    from .linear import LinearKernel

    gen = torch.Generator().manual_seed(1)
    cols, size = 1024, torch.empty(0, dtype=dtype).element_size()
    x = torch.randn(1, cols, generator=gen).to(dtype)
    answer = float(LINEAR_SIDE * LINEAR_SIDE * size)
    for nbytes in sorted(LINEAR_BYTES, reverse=True):
        rows = max(1, nbytes // (cols * size))
        weights = [(torch.randn(rows, cols, generator=gen) * 0.02).to(dtype) for _ in range((64 << 20) // nbytes)]
        if not _gemv_wins([LinearKernel(w) for w in weights], weights, x):
            break
        answer = float(nbytes)
    return answer


def _random_expert(fmt, hidden: int, inter: int, gen: torch.Generator) -> tuple:
    """(gate_up, down, gate_up scale, down scale) of random stored bytes in ``fmt``."""

    def one(rows: int, cols: int):
        if fmt.kind in ("bf16", "fp16", "fp32"):
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt.kind]
            return (torch.randn(rows, cols, generator=gen) * 0.05).to(dtype), None
        if fmt.kind == "fp8":
            b = torch.randint(0, 126, (rows, cols), dtype=torch.uint8, generator=gen)
            return b.view(torch.float8_e4m3fn), torch.rand(-(-rows // 128), -(-cols // 128), generator=gen) * 1e-3
        if fmt.kind == "mxfp4":
            return (
                torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8, generator=gen),
                torch.randint(118, 124, (rows, cols // 32), dtype=torch.uint8, generator=gen),
            )
        words = cols // 8 if fmt.kind == "int4" else cols // 4
        groups = cols // fmt.group_size if fmt.group_size else 1
        return (
            torch.randint(-(1 << 31), (1 << 31) - 1, (rows, words), dtype=torch.int32, generator=gen),
            (torch.rand(rows, groups, generator=gen) * 1e-2).to(torch.bfloat16),
        )

    (gw, gs), (dw, ds) = one(2 * inter, hidden), one(hidden, inter)
    return gw, dw, gs, ds


class Crossovers:
    """Measured crossovers, in memory and in one JSON file per machine (CPU, torch, thread count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[str, float]] = {}
        self._keys: dict[int, str] = {}  # thread count -> file key

    def _file(self, key: str):
        return cache_root() / f"crossover-{key}.json"

    def get(self, kind: str, compute: torch.dtype) -> float:
        """Rows per expert from which the GEMM path wins for ``kind`` in ``compute`` on this machine."""
        return self._answer(
            f"{kind}/{str(compute).removeprefix('torch.')}",
            measure_gemm_min_rows,
            kind,
            compute,
            "kernel/GEMM crossover %s = %s rows per expert (measured in %.1f s)",
        )

    def stream_rate(self, kind: str, compute: torch.dtype) -> float:
        """Stored bytes/s the kernel streams from DRAM at one row for ``kind`` on this machine (the offload cost
        model's CPU rate for experts the kernel computes)."""
        return self._answer(
            f"rate/{kind}/{str(compute).removeprefix('torch.')}",
            measure_stream_rate,
            kind,
            compute,
            "kernel stream rate %s = %.3g bytes/s (measured in %.1f s)",
        )

    def linear_rows(self, dtype: torch.dtype) -> float:
        """Rows up to which the kernels' GEMV beats ``F.linear`` on dense ``dtype`` weights here (0: never)."""
        return self._answer(
            f"linear/{str(dtype).removeprefix('torch.')}",
            lambda kind, compute: measure_linear_max_rows(compute),
            "dense",
            dtype,
            "kernel GEMV vs F.linear %s: the kernel up to %s rows (measured in %.1f s)",
        )

    def linear_min_bytes(self, dtype: torch.dtype) -> float:
        """Bytes of the smallest dense ``dtype`` weight whose one-row call the kernels' GEMV wins here (from
        :func:`measure_linear_min_bytes`)."""
        return self._answer(
            f"linear-bytes/{str(dtype).removeprefix('torch.')}",
            lambda kind, compute: measure_linear_min_bytes(compute),
            "dense",
            dtype,
            "kernel GEMV vs F.linear %s: the kernel from %s bytes (measured in %.1f s)",
        )

    def _answer(self, question: str, measure, kind: str, compute: torch.dtype, message: str) -> float:
        threads = torch.get_num_threads()
        key = self._keys.get(threads)
        if key is None:  # per-call questions (a dense linear's) skip rebuilding it
            key = self._keys[threads] = f"{cpu_fingerprint()}-{torch.__version__}-t{threads}"
        known = self._values.get(key)
        if known is not None and question in known:
            return known[question]
        with self._lock:
            values = self._values.setdefault(key, self._read(key))
            if question not in values:
                t0 = time.perf_counter()
                values[question] = measure(kind, compute)
                logger.info(message, question, values[question], time.perf_counter() - t0)
                try:
                    cache_root().mkdir(parents=True, exist_ok=True)
                    write_bytes(self._file(key), json.dumps(values, indent=1).encode())
                except OSError as exc:  # a read-only cache only means measuring again next time
                    logger.debug("could not keep the crossover in %s: %s", self._file(key), exc)
            return values[question]

    def _read(self, key: str) -> dict[str, float]:
        try:
            values = json.loads(self._file(key).read_text())
            return {k: float(v) for k, v in values.items()} if isinstance(values, dict) else {}
        except (OSError, ValueError):
            return {}

    def clear(self) -> None:
        with self._lock:
            self._values.clear()


#: the process's crossovers (explicit registry)
CROSSOVERS = Crossovers()
