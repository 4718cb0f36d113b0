"""Attention of a few query rows over a key/value cache, computed by the native kernels (a decode step's attention).

At decode a layer's attention is a handful of dot products per head, and transformers' CPU paths spend their time
around them: the eager functions repeat the cache for grouped-query heads (a copy of K and V per step that grows
with the context: 8x the cache for gpt-oss) and run a dozen small ops; ``scaled_dot_product_attention`` takes
about 100 us per call at one query. :func:`attend` is one call per layer: grouped heads read the cache in place,
the sink logits of gpt-oss are a softmax column without a value, and sums are in fp32 (outputs rounded once).
"""

from __future__ import annotations

import ctypes

import torch

from ..errors import InvalidArgumentError
from .errors import KernelUnavailableError
from .layer import WORKSPACES, Workspace, pick_variants
from .library import KERNELS, MASK_ADD, MASK_BOOL, MASK_NONE, MpAttn
from .spec import FLOAT_DTYPES

#: multiply-adds (per q.k and per p.v) from which a call is spread over torch's threads
PARALLEL_MIN_MACS = 1 << 21


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the first three dimensions of a 4-D tensor, 0 where a dimension has one element (broadcast)."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def _check(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_cpu or t.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentError(f"{name} must be a 4-D float CPU tensor, got {getattr(t, 'shape', type(t))}.")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidArgumentError(f"{name} must be contiguous along its last dimension.")


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    causal: bool = False,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` per head, as transformers' attention functions lay it out.

    Args:
        query: ``[B, Hq, Tq, D]``; key, value: ``[B, Hkv, S, D]`` with ``Hq`` a multiple of ``Hkv`` (query head ``h``
            reads key/value head ``h // (Hq // Hkv)``). Float32, bfloat16 or float16; key and value of one dtype.
        mask: broadcastable to ``[B, Hq, Tq, S]``: bool (True attends) or an additive float mask.
        sinks: ``[Hq]`` logits of a column with no value (gpt-oss's attention sinks), or None.
        causal: without a mask, query ``t`` sees keys up to ``S - Tq + t`` (the last ``Tq`` positions are the queries).

    Returns ``[B, Tq, Hq, D]`` in the query's dtype (sums in fp32, rounded once). A row with every key masked and
    no sink is zeros.
    """
    status = KERNELS.status()
    if not status.available:
        raise KernelUnavailableError(status.reason)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check(t, name)
    B, Hq, Tq, D = query.shape
    _, Hkv, S, _ = key.shape
    if key.shape != value.shape or key.dtype != value.dtype or key.shape[0] != B or key.shape[-1] != D:
        raise InvalidArgumentError(
            f"key {tuple(key.shape)} {key.dtype} and value {tuple(value.shape)} {value.dtype} must match each other "
            f"and the query {tuple(query.shape)}."
        )
    if Hkv == 0 or Hq % Hkv:
        raise InvalidArgumentError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads.")
    a = MpAttn()
    if mask is not None:
        if mask.dim() != 4 or not mask.is_cpu:
            raise InvalidArgumentError(f"mask must be a 4-D CPU tensor, got {tuple(mask.shape)} on {mask.device}.")
        mask = mask.expand(B, Hq, Tq, S)
        if S > 1 and mask.stride(-1) != 1:
            mask = mask.contiguous()
        if mask.dtype == torch.bool:
            a.mask_kind = MASK_BOOL
        elif mask.dtype in FLOAT_DTYPES:
            a.mask_kind, a.mask_dtype = MASK_ADD, FLOAT_DTYPES[mask.dtype]
        else:
            raise InvalidArgumentError(f"mask must be bool or float, got {mask.dtype}.")
        a.mask, a.ms[:] = mask.data_ptr(), _strides(mask)
    else:
        a.mask_kind = MASK_NONE
    if sinks is not None:
        if sinks.dim() != 1 or sinks.shape[0] != Hq or not sinks.is_cpu or sinks.dtype not in FLOAT_DTYPES:
            raise InvalidArgumentError(f"sinks must be a [{Hq}] float CPU tensor, got {tuple(sinks.shape)}.")
        sinks = sinks.contiguous()
        a.sinks, a.sinks_dtype = sinks.data_ptr(), FLOAT_DTYPES[sinks.dtype]
    out = torch.empty(B, Tq, Hq, D, dtype=query.dtype)
    if out.numel() == 0:
        return out
    variant, _ = pick_variants(status.variants, None)
    # a small call in one thread: waking the others costs more than the work (a decode step at short context)
    threads = torch.get_num_threads() if B * Hq * Tq * S * D >= PARALLEL_MIN_MACS else 1
    a.q, a.k, a.v, a.out = query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr()
    a.qs[:], a.ks[:], a.vs[:] = _strides(query), _strides(key), _strides(value)
    a.os[:] = (out.stride(0), out.stride(2), out.stride(1))
    a.B, a.Hq, a.Hkv, a.Tq, a.S, a.D = B, Hq, Hkv, Tq, S, D
    a.q_dtype, a.kv_dtype, a.out_dtype = FLOAT_DTYPES[query.dtype], FLOAT_DTYPES[key.dtype], FLOAT_DTYPES[out.dtype]
    a.causal, a.nthreads, a.scale = int(causal), threads, float(scale)
    ref = ctypes.byref(a)
    a.ws, a.ws_bytes = (workspace or WORKSPACES.get()).ensure(variant.attend_workspace(ref))
    rc = variant.attend(ref)
    if rc:
        raise RuntimeError(f"internal error: kernel attend returned {rc}")
    return out
