"""Bandwidths and the decision where a cache miss is computed (Fiddler / ktransformers idea).

An expert missing from the device cache but present in host RAM can either be copied to the device
(``bytes / BW_h2d``, then computed there) or computed by the CPU where it lies (``rows x flops /
CPU_FLOPS``, bounded below by reading its bytes from DRAM). At decode (one row) the CPU usually
wins on a PCIe machine; at prefill (many rows) the copy wins. The figures are measured once per
process by :func:`calibrate`; the decision is the pure :func:`prefer_cpu`.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Bandwidths:
    """Measured throughputs, bytes/s and FLOP/s. ``h2d`` and ``device_flops`` are 0 without a GPU."""

    dram: float
    cpu_flops: float
    h2d: float = 0.0
    device_flops: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def expert_flops_per_row(shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds x 2 of one row through one expert (its matrices)."""
    return sum(2 * s[0] * s[1] for s in shapes.values() if len(s) == 2)


def cpu_time(rows: int, nbytes: int, flops_per_row: int, bw: Bandwidths) -> float:
    """Seconds to compute ``rows`` rows on the CPU from weights in RAM (compute or memory bound)."""
    return max(rows * flops_per_row / bw.cpu_flops, nbytes / bw.dram)


def transfer_time(rows: int, nbytes: int, flops_per_row: int, bw: Bandwidths) -> float:
    """Seconds to copy the expert to the device and compute there."""
    if bw.h2d <= 0:
        return float("inf")
    return nbytes / bw.h2d + rows * flops_per_row / max(bw.device_flops, 1.0)


def prefer_cpu(rows: int, nbytes: int, flops_per_row: int, bw: Bandwidths) -> bool:
    """Whether computing a host-resident expert on the CPU beats copying it to the device."""
    return cpu_time(rows, nbytes, flops_per_row, bw) < transfer_time(rows, nbytes, flops_per_row, bw)


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=4)
def calibrate(device: str = "cpu", size_mb: int = 64) -> Bandwidths:
    """Measure DRAM copy bandwidth and CPU fp32 GEMM throughput (and pinned H2D on CUDA). ~0.3 s."""
    n = size_mb * 2**20 // 4
    src, dst = torch.empty(n), torch.empty(n)
    src.fill_(1.0)
    t = _median_time(lambda: dst.copy_(src))
    dram = 2 * n * 4 / t  # a copy reads and writes
    a, b = torch.randn(512, 1024), torch.randn(1024, 1024)
    t = _median_time(lambda: a @ b)
    cpu_flops = 2 * 512 * 1024 * 1024 / t
    h2d = device_flops = 0.0
    if device.startswith("cuda") and torch.cuda.is_available():  # pragma: no cover - needs a GPU
        pinned = src.pin_memory()
        gpu = torch.empty(n, device=device)
        gpu.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

        def copy():
            gpu.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        h2d = n * 4 / _median_time(copy)
        ga, gb = a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)

        def mm():
            ga @ gb
            torch.cuda.synchronize()

        device_flops = 2 * 512 * 1024 * 1024 / _median_time(mm)
    return Bandwidths(dram=dram, cpu_flops=cpu_flops, h2d=h2d, device_flops=device_flops)
