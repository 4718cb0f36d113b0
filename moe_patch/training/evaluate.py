"""Held-out language-model loss, the figure continued training is judged by."""

from __future__ import annotations

import math

import torch
from torch import nn

from .data import TokenBlocks


@torch.no_grad()
def held_out_loss(model: nn.Module, data: TokenBlocks, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over every block of ``data``, in eval mode, without router
    auxiliary losses (``output_router_logits=False``); the model's training mode is restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kwargs = {"output_router_logits": False} if hasattr(getattr(model, "config", None), "output_router_logits") else {}
    total, count = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            ids = data.blocks[start : start + batch_size].to(device)
            out = model(input_ids=ids, labels=ids, **kwargs)
            n = ids.numel() - ids.shape[0]  # predicted positions: every token but each block's first
            total += float(out.loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else math.nan
