"""The plain reference every fast dispatch path is tested against: one token, one slot at a time."""

from __future__ import annotations

import torch

from .core import ExpertFn


def reference_dispatch(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_experts: int,
    expert_fn: ExpertFn,
    *,
    weight_inputs: bool = False,
) -> torch.Tensor:
    """``out[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t])`` (or ``expert(w * x)`` with ``weight_inputs``),
    skipping slots whose index is ``>= num_experts`` (dropped). Slow by design: obviously correct."""
    T = hidden_states.shape[0]
    out = torch.zeros_like(hidden_states, dtype=torch.float64)
    for t in range(T):
        for j in range(top_k_index.shape[1]):
            e = int(top_k_index[t, j])
            if e >= num_experts:
                continue
            x = hidden_states[t : t + 1]
            w = top_k_weights[t, j]
            y = expert_fn(e, x * w) if weight_inputs else expert_fn(e, x) * w
            out[t] += y[0].double()
    return out.to(hidden_states.dtype)
