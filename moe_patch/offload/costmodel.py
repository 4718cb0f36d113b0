"""Bandwidths and the decision where a cache miss is computed (Fiddler / ktransformers idea).

An expert missing from the device cache but present in host RAM can either be copied to the device
(``bytes / BW_h2d``, then computed there) or computed by the CPU where it lies (``rows x flops /
CPU_FLOPS``, bounded below by reading its bytes from DRAM). At decode (one row) the CPU usually
wins on a PCIe machine; at prefill (many rows) the copy wins. The figures are measured once per
process by :func:`calibrate`; the decision is the pure :func:`prefer_cpu`.

Calibration measures what the engine will do, in the experts' dtype: a one-row GEMV streaming weights
larger than the last-level cache (bf16 GEMV is 8x slower than fp32 on some CPUs and as fast on
others), the round trip of a row to the CPU and back (a device sync), and buffers of 256 MiB for DRAM
(an H100 host's 64 MiB copy ran at a cache-inflated 212 GB/s).
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields

import torch

from ..timing import best_seconds


@dataclass(frozen=True)
class Bandwidths:
    """Measured throughputs, bytes/s and FLOP/s. ``h2d`` and ``device_flops`` are 0 without a GPU."""

    dram: float
    cpu_flops: float
    h2d: float = 0.0
    device_flops: float = 0.0
    cpu_gemv: float = 0.0  # bytes/s a one-row expert GEMV streams on the CPU (0: use ``dram``)
    roundtrip_s: float = 0.0  # moving a row to the CPU and its result back (CUDA: includes a sync)
    device_mem: float = 0.0  # bytes/s a device-to-device copy moves on the GPU (HBM), 0 without one
    disk: float = 0.0  # bytes/s of cold reads from the checkpoint's storage (0: not measured)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def expert_flops_per_row(shapes: dict[str, tuple[int, ...]]) -> int:
    """Multiply-adds x 2 of one row through one expert (its matrices)."""
    return sum(2 * s[0] * s[1] for s in shapes.values() if len(s) == 2)


def cpu_time(rows: int, nbytes: int, flops_per_row: int, bw: Bandwidths) -> float:
    """Seconds to compute ``rows`` rows on the CPU from weights in RAM (compute or memory bound)."""
    stream = bw.cpu_gemv or bw.dram
    return max(rows * flops_per_row / bw.cpu_flops, nbytes / stream) + bw.roundtrip_s


def transfer_time(rows: int, nbytes: int, flops_per_row: int, bw: Bandwidths) -> float:
    """Seconds to copy the expert to the device and compute there."""
    if bw.h2d <= 0:
        return float("inf")
    return nbytes / bw.h2d + rows * flops_per_row / max(bw.device_flops, 1.0)


def prefer_cpu(rows: int, nbytes: int, flops_per_row: int, bw: Bandwidths) -> bool:
    """Whether computing a host-resident expert on the CPU beats copying it to the device."""
    return cpu_time(rows, nbytes, flops_per_row, bw) < transfer_time(rows, nbytes, flops_per_row, bw)


def _best_time(fn, repeats: int = 5) -> float:
    # the shortest of a few: these figures are kept per machine, and a busy moment only ever adds time
    return best_seconds(fn, repeats=repeats, warmup=False)[0]  # callers warm up what needs it


def _device_key(device: str) -> str:
    """The calibrated device: the CPU (the machine's fingerprint says which), or the GPU by name."""
    if device.startswith("cuda") and torch.cuda.is_available():  # pragma: no cover - needs a GPU
        return f"cuda/{torch.cuda.get_device_name(torch.device(device))}"
    return "cpu"


@functools.lru_cache(maxsize=8)
def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, size_mb: int = 256) -> Bandwidths:
    """DRAM bandwidth, CPU GEMM and one-row GEMV throughput in ``dtype`` (and on CUDA pinned host-to-device
    bandwidth, device GEMM throughput and the row round trip): measured once per machine (about 1 s and
    ~650 MB for a moment) and kept with the dispatch's calibrations (:mod:`moe_patch.dispatch.calibration`,
    per machine fingerprint), so later loads on the same machine read them."""
    from ..dispatch.calibration import CALIBRATIONS

    question = f"offload_bandwidths/{_device_key(device)}/{str(dtype).removeprefix('torch.')}/{size_mb}MiB"
    fields = [f.name for f in dataclass_fields(Bandwidths) if f.name != "disk"]  # disk: per checkpoint
    measured = CALIBRATIONS.record(question, fields, lambda: measure_bandwidths(device, dtype, size_mb).as_dict())
    return Bandwidths(**{f: measured[f] for f in fields})


def gemv_rates(dtype: torch.dtype) -> tuple[float, float]:
    """Bytes/s a one-row GEMV streams on this CPU in ``dtype`` and in float32, timed in alternation (the choice
    between them reads their ratio, so both must see the same moments), measured once per machine."""
    from ..dispatch.calibration import CALIBRATIONS

    question = f"offload_gemv_vs_float32/cpu/{str(dtype).removeprefix('torch.')}"
    measured = CALIBRATIONS.record(question, ["half", "fp32"], lambda: _measure_gemv_rates(dtype))
    return measured["half"], measured["fp32"]


def _measure_gemv_rates(dtype: torch.dtype) -> dict[str, float]:
    def mats(dt: torch.dtype) -> list[torch.Tensor]:  # 64 MiB of 2048 x 2048 matrices: out of every cache
        return [torch.randn(2048, 2048).to(dt) for _ in range(max(1, 64 * 2**20 // (2048 * 2048 * dt.itemsize)))]

    half, fp32 = mats(dtype), mats(torch.float32)
    row_half, row_fp32 = torch.randn(1, 2048).to(dtype), torch.randn(1, 2048)
    t_half, t_fp32 = best_seconds(
        lambda: [torch.nn.functional.linear(row_half, m) for m in half],
        lambda: [torch.nn.functional.linear(row_fp32, m) for m in fp32],
    )
    return {
        "half": sum(m.numel() * m.element_size() for m in half) / t_half,
        "fp32": sum(m.numel() * m.element_size() for m in fp32) / t_fp32,
    }


def measure_bandwidths(device: str = "cpu", dtype: torch.dtype = torch.float32, size_mb: int = 256) -> Bandwidths:
    """Measure what :func:`calibrate` keeps, now."""
    n = size_mb * 2**20 // 4
    src, dst = torch.empty(n), torch.empty(n)
    src.fill_(1.0)
    dst.fill_(0.0)  # first touch outside the timing
    t = _best_time(lambda: dst.copy_(src), repeats=3)
    dram = 2 * n * 4 / t  # a copy reads and writes
    dst = None  # free the 256 MiB before the GEMM timings
    # 64 rows: enough for the GEMM kernels, short where half precision is slow (0.2 s on a 2-core AVX2 VM)
    a, b = torch.randn(64, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
    t = _best_time(lambda: a @ b, repeats=3)
    cpu_flops = 2 * 64 * 1024 * 1024 / t
    # one row through weights that do not fit in cache, as a decode-time expert on the CPU
    mats = [torch.randn(2048, 2048).to(dtype) for _ in range(max(1, 64 * 2**20 // (2048 * 2048 * dtype.itemsize)))]
    row = torch.randn(1, 2048).to(dtype)
    t = _best_time(lambda: [torch.nn.functional.linear(row, m) for m in mats], repeats=3)
    cpu_gemv = sum(m.numel() * m.element_size() for m in mats) / t
    h2d = device_flops = roundtrip = device_mem = 0.0
    if device.startswith("cuda") and torch.cuda.is_available():  # pragma: no cover - needs a GPU
        m = 64 * 2**20 // 4
        pinned = src[:m].pin_memory()
        gpu = torch.empty(m, device=device)
        gpu.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()

        def copy():
            gpu.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        h2d = m * 4 / _best_time(copy)
        ga, gb = a.to(device, torch.bfloat16), b.to(device, torch.bfloat16)

        def mm():
            ga @ gb
            torch.cuda.synchronize()

        device_flops = 2 * 64 * 1024 * 1024 / _best_time(mm)
        grow = row.to(device)
        roundtrip = _best_time(lambda: grow.to("cpu").to(device).sum().item())
        big = torch.empty(n, device=device)
        other = torch.empty_like(big)

        def d2d():
            other.copy_(big)
            torch.cuda.synchronize()

        device_mem = 2 * n * 4 / _best_time(d2d)
    return Bandwidths(
        dram=dram,
        cpu_flops=cpu_flops,
        h2d=h2d,
        device_flops=device_flops,
        cpu_gemv=cpu_gemv,
        roundtrip_s=roundtrip,
        device_mem=device_mem if device.startswith("cuda") else 0.0,
    )


def measure_disk(files: list[str], limit: int = 64 * 2**20) -> float:
    """Cold read bandwidth of the checkpoint's storage: up to ``limit`` bytes of its largest shard, dropped
    from the page cache first (``posix_fadvise``), read in expert-sized requests. 0 when it cannot tell."""
    import os

    if not files or not hasattr(os, "posix_fadvise"):
        return 0.0
    path = max(files, key=os.path.getsize)
    size = min(limit, os.path.getsize(path))
    if size < 2**20:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf = bytearray(4 * 2**20)
        t0 = time.perf_counter()
        done = 0
        while done < size:
            got = os.preadv(fd, [memoryview(buf)[: min(len(buf), size - done)]], done)
            if got <= 0:
                break
            done += got
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return done / elapsed if elapsed > 0 else 0.0


def expected_use_s(
    budget: int | None, n_experts: int, entry_bytes: int, decode_s: float, miss_s: float, decode_on_hit: bool
) -> float:
    """Expected seconds per expert use for a device cache of ``budget`` bytes whose entries take
    ``entry_bytes``: a miss brings the stored expert in (``miss_s``), and it is decoded on every use
    (``decode_on_hit``, stored entries) or once per miss (decoded entries). The hit rate is taken as the
    cached share of the experts (uniform routing: a lower bound; skewed routing only helps both)."""
    held = n_experts if budget is None else budget // max(entry_bytes, 1)
    hit = min(1.0, held / max(n_experts, 1))
    if decode_on_hit:
        return decode_s + (1.0 - hit) * miss_s
    return (1.0 - hit) * (miss_s + decode_s)


def choose_device_format(
    budget: int | None, n_experts: int, stored_bytes: int, decoded_bytes: int, decode_s: float, miss_s: float
) -> str:
    """``"stored"`` or ``"dequantized"``: how the device cache keeps experts of a quantized checkpoint.

    Stored entries fit ``decoded_bytes / stored_bytes`` times more experts but pay a decode on every use;
    with a partial fit that wins exactly when a miss costs more than a decode (PCIe or disk against a
    GPU decode), and never when everything fits decoded.
    """
    if budget is not None and budget < decoded_bytes:
        return "stored"  # not even one decoded expert fits
    stored = expected_use_s(budget, n_experts, stored_bytes, decode_s, miss_s, decode_on_hit=True)
    decoded = expected_use_s(budget, n_experts, decoded_bytes, decode_s, miss_s, decode_on_hit=False)
    return "stored" if stored < decoded else "dequantized"


def time_stored_expert(source, layer: int, device: torch.device) -> tuple[float, float]:
    """``(read_s, decode_s)`` of one stored expert of ``layer``: read from the source (as a miss would),
    then decoded on ``device`` (after its copy, on CUDA). Used once at attach for the device format."""
    t0 = time.perf_counter()
    recipes = source.cmap.experts[(layer, 0)]
    stored = [source.cmap.reader.load_stored(r) for r in recipes.values() if r.stored is not None]
    read_s = time.perf_counter() - t0
    if device.type == "cuda":  # pragma: no cover - GPU only
        stored = [s.to(device) for s in stored]
        torch.cuda.synchronize(device)

    def decode():
        for s in stored:
            s.dequantize()
        if device.type == "cuda":  # pragma: no cover - GPU only
            torch.cuda.synchronize(device)

    decode()  # warm-up (lookup tables, allocator)
    return read_s, _best_time(decode, repeats=3)


def choose_compute_dtype(
    budget: int | None, n_experts: int, half_bytes: int, half_s: float, fp32_s: float, miss_s: float
) -> str:
    """``"half"`` or ``"fp32"``: the dtype a CPU keeps half-precision experts in its slots to compute them.

    fp32 slots hold half as many experts (a miss costs ``miss_s`` more often) but compute each use in
    ``fp32_s`` instead of ``half_s``: on CPUs without native bf16 arithmetic a bf16 GEMV can be several
    times slower than an fp32 one reading twice the bytes. Expected seconds per use, uniform routing.
    """
    if budget is not None and budget < 2 * half_bytes:
        return "half"  # not one fp32 expert fits
    half = expected_use_s(budget, n_experts, half_bytes, half_s, miss_s, decode_on_hit=True)
    fp32 = expected_use_s(budget, n_experts, 2 * half_bytes, fp32_s, miss_s, decode_on_hit=True)
    return "fp32" if fp32 < 0.9 * half else "half"
