"""Attach-time decisions, made once: where the experts' tiers live and in which form, from the options, the
layers, the source and the machine's measured bandwidths. The engine only carries them out.

- the cache format (``quantize_experts``: nf4/int8 in the caches), refused for already quantized checkpoints;
- how the device slots keep experts of a quantized checkpoint (``device_format``: decoded once on insert, or
  stored and decoded per use; the cost model chooses for ``"auto"``);
- on a CPU, the dtype slots keep half-precision experts in (fp32 where this machine's fp32 GEMV beats its
  bf16/fp16 one by more than the capacity it costs, measured);
- whether the CPU computes host-resident misses (``cpu_compute``);
- the budgets, checked against the size of one expert in each tier.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..errors import MoEConfigError
from ..formats import Format, cache_format
from .budget import check_budget
from .costmodel import (
    Bandwidths,
    calibrate,
    choose_compute_dtype,
    choose_device_format,
    gemv_rates,
    measure_disk,
    time_stored_expert,
)
from .layers import OffloadLayer
from .options import OffloadOptions
from .slot_kernels import kernel_serves

if TYPE_CHECKING:
    from .sources import ExpertSource

logger = logging.getLogger(__name__)


def default_io_threads() -> int:
    """Reader threads: they wait on the disk (stored bytes go straight into their slots, nothing is decoded
    there), and one synchronous reader leaves an SSD's queue mostly empty. Two at least, one per two cores beyond,
    at most four: a gpt-oss-120b-shaped MXFP4 run from disk on the 2-core VM decoded at 0.45 tok/s with one reader
    and 0.61-0.65 with 2, 4 or 8 (docs/benchmarks.md, 2026-12-07 evening)."""
    return max(2, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class EnginePlan:
    """What the engine does, decided at attach.

    Attributes:
        device: the compute device.
        expert_cache / host_cache: the budgets in bytes (None: no limit).
        cache_format: the format the caches encode full-precision experts in (nf4/int8), or None.
        stored: the source gives experts in a compact stored form (a quantized checkpoint, or floats in
            another dtype than the model's) that is decoded where it is computed.
        device_format: ``"stored"`` or ``"dequantized"``: how device slots keep stored experts.
        compute_dtype: the dtype device slots keep experts in when it is not the model's (CPU fp32), or None.
        cpu_compute: ``"auto"``, ``"always"`` or ``"never"`` (misses computed on the CPU from host RAM).
        bandwidths: measured throughputs (None when calibration is off).
        io_threads: background reader threads (0: no prefetch).
    """

    device: torch.device
    expert_cache: int | None
    host_cache: int | None
    cache_format: Format | None
    stored: bool
    device_format: str
    compute_dtype: torch.dtype | None
    cpu_compute: str
    bandwidths: Bandwidths | None
    io_threads: int

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def compute_ready(self) -> bool:
        """Device slots hold experts decoded in the compute dtype, in preallocated slabs (one grouped GEMM
        per layer), unless they stay stored or cache-encoded there (objects decoded per use)."""
        return self.cache_format is None and (not self.stored or self.device_format == "dequantized")

    @property
    def slot_dtype(self) -> torch.dtype | None:
        return self.compute_dtype if self.compute_ready else None

    @property
    def decode_on_insert(self) -> bool:
        """A slot is a decoded copy of what the host tier keeps (stored bytes, or another dtype)."""
        return self.compute_ready and (self.stored or self.compute_dtype is not None)

    @property
    def merged(self) -> bool:
        """On a CPU the device slots already are host RAM: one RAM tier (both budgets add up), unless the
        host keeps the compact stored copy of experts the slots hold decoded."""
        return not self.on_cuda and not self.decode_on_insert

    @property
    def device_budget(self) -> int | None:
        """The bytes device slots may take (a merged CPU tier adds the host budget)."""
        if self.merged and self.expert_cache is not None:
            return None if self.host_cache is None else self.expert_cache + self.host_cache
        return self.expert_cache

    @property
    def host_budget(self) -> int | None:
        return 0 if self.merged else self.host_cache

    def computes_on_cpu(self) -> bool:
        """Whether a miss in host RAM may be computed by the CPU: on CUDA unless ``"never"``; on a CPU-only
        run (where everything is the CPU's) only on request (``"always"``)."""
        return self.cpu_compute != "never" if self.on_cuda else self.cpu_compute == "always"


def make_plan(
    opts: OffloadOptions,
    layers: list[OffloadLayer],
    source: ExpertSource,
    checkpoint_files: list[str] | None = None,
    quantization: str | None = None,
) -> EnginePlan:
    """The engine's plan for these layers (``quantization``: the checkpoint's own method, if any).

    Raises :class:`MoEConfigError` / :class:`~moe_patch.errors.BudgetError` for choices that cannot work.
    """
    device = opts.torch_device
    fmt = cache_format(opts.quantize_experts)
    if fmt is not None and quantization is not None:
        raise MoEConfigError(
            f"quantize_experts={fmt.name!r}: this checkpoint's experts are already quantized "
            f"({quantization}) and are kept in their stored bytes; drop quantize_experts."
        )
    expert_cache, host_cache = opts.expert_cache_bytes, opts.host_cache_bytes
    # a budget below the most compact form of one expert fails before the machine is calibrated (~1 s)
    compact = max(host_expert_bytes(layer, source, fmt) for layer in layers)
    check_budget(expert_cache, compact, name="expert_cache", allow_zero=False)
    check_budget(host_cache, compact, name="host_cache", allow_zero=True)
    bandwidths = calibrate(str(device), layers[0].dtype) if opts.calibrate else None
    if bandwidths is not None and checkpoint_files:  # the storage's own speed, measured cold
        bandwidths = replace(bandwidths, disk=measure_disk(checkpoint_files))
    stored = source.stored
    device_format = _device_format(opts, source, layers, expert_cache, host_cache, device, bandwidths)
    compute_dtype = (
        None
        if stored and device_format == "stored"
        else _compute_dtype(
            opts,
            source,
            layers,
            expert_cache,
            host_cache,
            device,
            fmt,
            bandwidths.disk if bandwidths is not None else 0.0,
        )
    )
    host_bytes = max(host_expert_bytes(layer, source, fmt) for layer in layers)
    device_bytes = (
        max(layer.expert_bytes for layer in layers) if device_format == "dequantized" and stored else host_bytes
    )
    if compute_dtype is not None:
        device_bytes = max(layer.expert_bytes for layer in layers) * 4 // layers[0].dtype.itemsize
    check_budget(expert_cache, device_bytes, name="expert_cache", allow_zero=False)
    check_budget(host_cache, host_bytes, name="host_cache", allow_zero=True)
    return EnginePlan(
        device=device,
        expert_cache=expert_cache,
        host_cache=host_cache,
        cache_format=fmt,
        stored=stored,
        device_format=device_format if stored else "dequantized",
        compute_dtype=compute_dtype,
        cpu_compute=opts.cpu_compute,
        bandwidths=bandwidths,
        io_threads=default_io_threads() if opts.prefetch else 0,
    )


def encoded_nbytes(layer: OffloadLayer, fmt: Format) -> int:
    """Bytes one expert of ``layer`` takes once the caches encode it in ``fmt`` (vectors stay as they are)."""
    return sum(
        fmt.encoded_nbytes(s, layer.dtype) if len(s) == 2 else layer.dtype.itemsize * _numel(s)
        for s in layer.shapes.values()
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def host_expert_bytes(layer: OffloadLayer, source: ExpertSource, fmt: Format | None) -> int:
    """Bytes one expert takes in the host tier: cache-encoded, stored (quantized checkpoints) or model dtype."""
    if fmt is not None:
        return encoded_nbytes(layer, fmt)
    return source.nbytes(layer.index, 0)


def _device_format(
    opts: OffloadOptions,
    source: ExpertSource,
    layers: list[OffloadLayer],
    expert_cache: int | None,
    host_cache: int | None,
    device: torch.device,
    bandwidths: Bandwidths | None,
) -> str:
    """How the device cache keeps experts of a quantized checkpoint (the cost model's choice for "auto")."""
    if not source.stored:
        return "dequantized"  # nothing to decode: the stored bytes are the model's
    if opts.device_format != "auto":
        return opts.device_format
    if device.type == "cpu" and kernel_serves(layers, {layer.index: source.example(layer.index) for layer in layers}):
        # the CPU kernels compute from the stored bytes at least as fast as from decoded copies (they read
        # fewer bytes, each once: moe_patch/kernels/README.md): the slots keep what the checkpoint stores
        logger.info("device cache keeps experts stored (the CPU kernels read them)")
        return "stored"
    n = sum(layer.num_experts for layer in layers)
    stored = max(source.nbytes(layer.index, 0) for layer in layers)
    decoded = max(layer.expert_bytes for layer in layers)
    if expert_cache is None or expert_cache >= n * decoded:
        return "dequantized"
    if bandwidths is None or expert_cache < decoded:  # not calibrated, or no decoded expert fits: capacity
        return "stored"
    read_s, decode_s = time_stored_expert(source, layers[0].index, device)
    if host_cache:  # misses come from the host tier: a PCIe copy on CUDA, nothing beyond the decode on CPU
        miss_s = stored / bandwidths.h2d if device.type == "cuda" and bandwidths.h2d else 0.0
    else:
        miss_s = read_s
    choice = choose_device_format(expert_cache, n, stored, decoded, decode_s, miss_s)
    logger.info(
        "device cache keeps experts %s (decode %.2f ms, miss %.2f ms per expert)", choice, 1e3 * decode_s, 1e3 * miss_s
    )
    return choice


def _compute_dtype(
    opts: OffloadOptions,
    source: ExpertSource,
    layers: list[OffloadLayer],
    expert_cache: int | None,
    host_cache: int | None,
    device: torch.device,
    fmt: Format | None,
    disk_bw: float,
) -> torch.dtype | None:
    """On a CPU, the dtype the slots keep half-precision experts in (None: the model's): fp32 where this
    machine's fp32 GEMV beats its bf16/fp16 one by more than the capacity it costs (measured)."""
    dtype = layers[0].dtype
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16) or fmt is not None or not opts.calibrate:
        return None
    if source.stored and opts.device_format == "stored":
        return None
    if kernel_serves(
        layers,
        {
            layer.index: {n: torch.empty(shape, dtype=dtype, device="meta") for n, shape in layer.shapes.items()}
            for layer in layers
        },
    ):
        return None  # the CPU kernels compute half-precision slots in place (bf16 dot products, fp32 sums)
    half_rate, fp32_rate = gemv_rates(dtype)
    fp32_bw = calibrate("cpu", torch.float32)
    half_bytes = max(layer.expert_bytes for layer in layers)
    n = sum(layer.num_experts for layer in layers)
    half_s = half_bytes / half_rate
    fp32_s = 2 * half_bytes / fp32_rate
    stored = max(host_expert_bytes(layer, source, None) for layer in layers)
    # a miss comes from the host tier (RAM) when there is one, else from the checkpoint's storage
    miss_s = stored / (disk_bw if not host_cache and disk_bw > 0 else fp32_bw.dram)
    choice = choose_compute_dtype(expert_cache, n, half_bytes, half_s, fp32_s, miss_s)
    logger.info(
        "CPU experts computed in %s (GEMV per expert: %.2f ms %s, %.2f ms float32)",
        "float32" if choice == "fp32" else dtype,
        1e3 * half_s,
        dtype,
        1e3 * fp32_s,
    )
    return torch.float32 if choice == "fp32" else None
