"""Helpers of the patch tests: tiny models by name, their main output, transformers' tied-weights check."""

from __future__ import annotations

import collections
import copy
import io

import torch

from moe_patch.testing.legacy import legacy_moe_model
from moe_patch.testing.tiny import main_output, tiny_model


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    """``(model, forward kwargs)`` of a tiny family model, or of a ModuleList model ("legacy-mixtral",
    "legacy-deepseek", from :mod:`moe_patch.testing.legacy`); the same arguments build the same weights."""
    if name.startswith("legacy-"):
        model = legacy_moe_model(name.split("-", 1)[1], seed=seed, **overrides).to(dtype)
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
        return model, {"input_ids": ids}
    return tiny_model(name, dtype=dtype, seed=seed, **overrides)


def copied(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """A copy of ``model`` made the way users make one: ``"deepcopy"``, or ``"pickle"`` (``torch.save`` of the
    whole module and ``torch.load`` back)."""
    if how == "deepcopy":
        return copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs))


def undeclared_shared_storage(model: torch.nn.Module) -> list[list[str]]:
    """transformers' tied-weights check (``test_tied_weights_keys``): state-dict entries that share a
    storage must be declared tied. Returns the groups that share one without being declared."""
    from transformers.pytorch_utils import id_tensor_storage

    groups = collections.defaultdict(list)
    for name, tensor in model.state_dict().items():
        groups[id_tensor_storage(tensor)].append(name)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    return [g for g in ([n for n in group if n not in tied] for group in groups.values()) if len(g) > 1]
