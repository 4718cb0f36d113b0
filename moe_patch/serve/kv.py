"""The key/value cache of a batch of sequences of different lengths, and of one sequence kept for later.

A batch keeps one ``DynamicCache`` whose rows are left-padded to one length: row ``r`` holds ``pads[r]`` unused
positions, then its own tokens. The attention mask marks the pads (0) and each row's positions count its own
tokens only (``position_ids``), which is how ``generate()`` runs a left-padded batch, so every row attends to
exactly the keys and values it would have alone. Rows join (their cache padded to the batch's length, or the batch
to theirs) and leave (the rows dropped, then the pad columns no row needs any more) between decode steps.

Only caches made of transformers' plain ``DynamicLayer`` (every layer full attention, one key and one value tensor
of shape ``[batch, heads, length, head_dim]``) can be padded so; :func:`plain_layers` says which caches are. A cache
is rebuilt through its public ``update`` (which appends to an empty layer), never by writing a layer's fields.
"""

from __future__ import annotations

from typing import Any

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, length, head_dim]


def plain_layers(cache: Any) -> bool:
    """Whether ``cache`` is a ``DynamicCache`` of plain full-attention layers (which can be padded and cut)."""
    from transformers import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def tensors(cache: Any) -> KV:
    """The keys and values of every layer of a plain cache (views, not copies)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def new_cache(config: Any, kv: KV | None = None) -> Any:
    """A ``DynamicCache`` for ``config`` holding ``kv`` (copied in, so later appends never touch ``kv``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv or []):
        cache.update(k, v, i)
    return cache


def pad_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` ([batch, heads, length, dim]) with ``n`` zero positions before its first."""
    if n == 0:
        return x
    return torch.cat([x.new_zeros(*x.shape[:2], n, x.shape[3]), x], dim=2)


def join(batch: KV, pads: list[int], row: KV) -> tuple[KV, list[int]]:
    """``batch`` (rows left-padded by ``pads``) with ``row`` (one sequence, no padding) added as its last row."""
    if not batch:
        return list(row), [0]
    length = batch[0][0].shape[2]
    row_length = row[0][0].shape[2]
    width = max(length, row_length)
    out = []
    for (bk, bv), (rk, rv) in zip(batch, row):
        out.append(
            (
                torch.cat([pad_left(bk, width - length), pad_left(rk, width - row_length)]),
                torch.cat([pad_left(bv, width - length), pad_left(rv, width - row_length)]),
            )
        )
    return out, [p + width - length for p in pads] + [width - row_length]


def keep(batch: KV, pads: list[int], rows: list[int]) -> tuple[KV, list[int]]:
    """Only ``rows`` of ``batch``, without the pad positions every kept row has."""
    if not rows:
        return [], []
    kept = [pads[r] for r in rows]
    cut = min(kept)
    index = torch.tensor(rows, device=batch[0][0].device)
    out = [(k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:]) for k, v in batch]
    return out, [p - cut for p in kept]


def row(batch: KV, pads: list[int], r: int) -> KV:
    """Row ``r``'s own keys and values, without its padding: a copy, so the batch's memory can go."""
    return [(k[r : r + 1, :, pads[r] :].clone(), v[r : r + 1, :, pads[r] :].clone()) for k, v in batch]


def prefix(kv: KV, length: int) -> KV:
    """The first ``length`` positions of a one-sequence cache (views)."""
    return [(k[:, :, :length], v[:, :, :length]) for k, v in kv]


def nbytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def attention_mask(pads: list[int], length: int, device: Any) -> torch.Tensor:
    """The 2-D mask of a batch ``length`` positions long whose rows begin with ``pads`` unused positions."""
    positions = torch.arange(length, device=device)
    return (positions[None, :] >= torch.tensor(pads, device=device)[:, None]).long()
