"""What a generation needs on the device besides the weights: the KV cache and the activations of a forward.

Used by the memory plan of ``moe-patch inspect --gpu/--ram --ctx-size`` and by the expert-cache budget
``"auto"`` chooses (:mod:`.auto_budget`). Nothing here reads a file.

The KV cache is what transformers itself stores: :func:`kv_cache_elements` runs the model's own forward on
the ``meta`` device (shapes only: no memory, no weights, the routed experts answer zeros) over the context
and counts the tensors its ``DynamicCache`` holds. That follows every attention transformers implements
(grouped-query, compressed MLA latents, sliding and chunked windows, hybrid linear-attention layers, layers
that share a cache) without a table of families. Where a model cannot run on ``meta`` (a data-dependent op,
an encoder-decoder, a cache class of its own), :func:`kv_elements_estimate` counts from the config's fields.
"""

from __future__ import annotations

import inspect
import logging
import types
from typing import Any

logger = logging.getLogger(__name__)

#: Share of the device's memory kept free besides everything counted (allocator, fragmentation, workspaces).
HEADROOM = 0.10

#: Layer types whose cache keeps every token, and those bounded by a window (transformers' names).
_FULL = {"full_attention", "attention", "global", "global_attention", "hybrid", "indexed_attention"}
_WINDOW = {"sliding_attention", "chunked_attention", "local", "local_attention", "hybrid_sliding"}


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def model_context(config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its text config), None if it has none."""
    return _int(_text_config(config), "max_position_embeddings")


# -- the KV cache ----------------------------------------------------------------------------------------------
def kv_elements_estimate(config: Any, tokens: int) -> int:
    """Elements of the KV cache after ``tokens`` tokens (batch 1), counted from the config's fields: keys and
    values of every head kept (``num_key_value_heads`` x ``head_dim``), or one MLA latent and rotary key per
    token (``kv_lora_rank + qk_rope_head_dim``, as transformers caches DeepSeek-V3); a sliding or chunked layer
    keeps ``window - 1`` tokens; a layer of another type (linear attention, Mamba) nothing per token."""
    text = _text_config(config)
    heads = _int(text, "num_attention_heads", "n_heads") or 1
    if _int(text, "kv_lora_rank") and _int(text, "qk_rope_head_dim"):
        per_token = _int(text, "kv_lora_rank") + _int(text, "qk_rope_head_dim")
    else:
        kv_heads = _int(text, "num_key_value_heads", "kv_n_heads", "num_kv_heads") or heads
        head_dim = _int(text, "head_dim") or (_int(text, "hidden_size", "d_model") or 0) // heads
        per_token = 2 * kv_heads * head_dim
    layers = _int(text, "num_hidden_layers", "num_layers", "n_layers") or 0
    window = _int(text, "sliding_window", "attention_chunk_size")
    kinds = getattr(text, "layer_types", None)
    if not isinstance(kinds, (list, tuple)) or len(kinds) != layers:
        kinds = ["sliding_attention" if window else "full_attention"] * layers
    kept = 0
    for kind in kinds:
        if kind in _FULL:
            kept += tokens
        elif kind in _WINDOW:
            kept += min(tokens, window - 1) if window else tokens
    return per_token * kept


def _cache_elements(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel"):
                total += t.numel()
    return total


def _zeros(self, hidden_states, *args, **kwargs):
    return hidden_states.new_zeros(hidden_states.shape)


def measured_kv_elements(config: Any, tokens: int, *, trust_remote_code: bool = False) -> int:
    """Elements transformers' ``DynamicCache`` holds after a forward over ``tokens`` tokens (batch 1), from the
    model's own forward on the ``meta`` device. Raises whatever that forward raises."""
    import torch
    from transformers import DynamicCache
    from transformers.utils import logging as hf_logging

    from ..detect.config import meta_model
    from ..families.find import find_moe_blocks

    model = meta_model(config, trust_remote_code=trust_remote_code)
    for handle in find_moe_blocks(model):  # the routed experts' output does not shape the cache
        handle.experts.forward = types.MethodType(_zeros, handle.experts)
    cache = DynamicCache(config=model.config)
    # transformers 5.25 renamed forward's `past_key_values` to `cache` (the old name warns until 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' warnings about a config seen on meta are not the user's
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{cache_arg: cache})
    finally:
        hf_logging.set_verbosity(verbosity)
    return _cache_elements(cache)


def kv_cache_elements(config: Any, tokens: int, *, trust_remote_code: bool = False) -> tuple[int, bool]:
    """``(elements, exact)``: the KV cache after ``tokens`` tokens, measured on ``meta`` (``exact``), else
    estimated from the config (:func:`kv_elements_estimate`)."""
    try:
        return measured_kv_elements(config, tokens, trust_remote_code=trust_remote_code), True
    except Exception as exc:  # noqa: BLE001 - any failure of a model on meta: the estimate is the answer
        logger.debug(
            "KV cache of %s not measured on meta (%s: %s); estimated from the config",
            getattr(config, "model_type", "?"),
            type(exc).__name__,
            exc,
        )
        return kv_elements_estimate(config, tokens), False


# -- activations -----------------------------------------------------------------------------------------------
def activation_bytes(config: Any, tokens: int, dtype_bytes: float) -> int:
    """An estimate of the working memory of one forward over ``tokens`` tokens (the prefill of a prompt of that
    length, batch 1), beyond weights and cache: the widest layer's temporaries plus the last position's logits.

    Per token: the residual stream, its normed copy, attention's queries, keys, values and output (six hidden
    widths), and per routed slot (top-k of them) the gathered row and the expert's output (two hidden widths)
    and gate, up and their product (three expert widths), plus the router's fp32 logits. Logits: generate()
    computes the last position only, in fp32, and its processors copy them a few times (four vocabularies).
    Attention scores are not counted: PyTorch's SDPA kernels do not materialise them."""
    text = _text_config(config)
    hidden = _int(text, "hidden_size", "d_model") or 0
    top_k = _int(text, "num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token") or 1
    width = _int(text, "moe_intermediate_size", "expert_ffn_hidden_size", "intermediate_size") or 4 * hidden
    experts = _int(text, "num_local_experts", "num_experts", "n_routed_experts") or 0
    vocab = _int(text, "vocab_size") or 0
    per_token = dtype_bytes * (6 * hidden + top_k * (2 * hidden + 3 * width)) + 4 * experts
    return int(tokens * per_token + 4 * 4 * vocab)
