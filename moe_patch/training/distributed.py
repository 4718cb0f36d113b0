"""Routing figures of a data-parallel run: every process's counts summed, so the figures describe the whole batch.

Under ``torchrun`` / ``accelerate launch`` each process routes its own share of the batch, so figures computed
from one process's counts describe that share only. :func:`sum_over_processes` adds the additive counts of every
process with one ``all_reduce``; every figure (load balance, entropy, z-loss...) is then computed from the whole
batch's counts.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from ..monitoring.stats import LayerCounts, LayerRouting, RoutingReport

#: LayerCounts fields that name the layer rather than count something; they are the same on every process.
_KEYS = ("path", "num_experts", "top_k", "zero_experts")


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group (1 when it is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and the CPU backends) reduce CPU ones.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flatten(counts: LayerCounts) -> list[float]:
    width = counts.num_experts + counts.zero_experts
    out: list[float] = []
    for f in fields(LayerCounts):
        if f.name in _KEYS:
            continue
        value = getattr(counts, f.name)
        if isinstance(value, list):
            out += list(value) + [0] * (width - len(value))  # `requested` is empty outside capacity families
        else:
            out.append(value)
    return out


def _unflatten(counts: LayerCounts, values: list[float]) -> LayerCounts:
    width = counts.num_experts + counts.zero_experts
    it = iter(values)
    out = {}
    for f in fields(LayerCounts):
        value = getattr(counts, f.name)
        if f.name in _KEYS:
            out[f.name] = value
        elif isinstance(value, list):
            summed = [round(next(it)) for _ in range(width)]
            out[f.name] = summed if value or any(summed) else []
        else:
            total = next(it)
            out[f.name] = round(total) if isinstance(value, int) else total
    return LayerCounts(**out)


def sum_over_processes(report: RoutingReport) -> RoutingReport:
    """``report`` with every layer's counts summed over the processes of the default group (and ``calls``
    summed; ``top1_changed``, a share, averaged over the processes that measured it). A collective: every
    process calls it at the same point with a report of the same layers. Without a process group, returns
    ``report`` unchanged."""
    if world_size() == 1:
        return report
    rows = [_flatten(layer.counts) for layer in report.layers]
    changed = [(layer.top1_changed or 0.0, 0.0 if layer.top1_changed is None else 1.0) for layer in report.layers]
    flat = [v for row in rows for v in row] + [v for pair in changed for v in pair] + [float(report.calls)]
    # float64 holds every count exactly up to 2**53
    buffer = torch.tensor(flat, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(buffer)
    total = buffer.tolist()
    layers, offset = [], 0
    for layer, row in zip(report.layers, rows):
        layers.append(LayerRouting(_unflatten(layer.counts, total[offset : offset + len(row)])))
        offset += len(row)
    for layer in layers:
        share, measured = total[offset], total[offset + 1]
        layer.top1_changed = share / measured if measured else None
        offset += 2
    return replace(report, layers=layers, calls=round(total[offset]))
