"""A decode step's attention on the CPU through the kernels (:func:`moe_patch.kernels.attention.attend`), as an
attention implementation registered with transformers' own ``AttentionInterface``.

transformers' CPU attention at one query is a dozen small ops per layer, and the eager functions of grouped-query
models (gpt-oss and its sinks among them) copy the whole key/value cache ``Hq / Hkv`` times per step, so the step
grows with the context (gpt-oss shapes, 4096 cached tokens: 22 ms per layer eager, 0.8 ms here). Each registered
implementation wraps one of transformers' (``eager``, ``sdpa``), builds the same masks as it (its mask function is
registered under the new name) and hands it every call the kernel does not take: more than
:data:`MAX_QUERY_ROWS` query rows (prefill), autograd, dropout, compiling and tracing, softcapping, requested
attention weights, key and value head sizes that differ, a module with sinks that were not passed as ``s_aux``, or
an argument outside :data:`KNOWN_KWARGS` (T5's position bias). At install each attention class is checked on random
rows against its own function; a family whose function computes something else keeps it.
Numbers: fp32 sums (eager's bf16 rounds logits and probabilities in bf16), so bf16 outputs move within bf16
rounding; fp32 within 1e-6.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .dense_linears import _torch_only
from .kernels.attention import attend
from .kernels.spec import FLOAT_DTYPES

logger = logging.getLogger(__name__)

#: the implementation registered for each of transformers' own
IMPLEMENTATIONS = {"eager": "moe_patch_cpu_eager", "sdpa": "moe_patch_cpu_sdpa"}
#: query rows up to which the kernel computes a call (decode, speculative tokens); above, the wrapped implementation
MAX_QUERY_ROWS = 16
#: keyword arguments the attention modules pass that the kernel computes, or that do not change the maths (the
#: mask carries sliding windows); a call with any other argument set (T5's position_bias ...) goes to transformers
KNOWN_KWARGS = frozenset(
    {
        "s_aux",
        "is_causal",
        "sliding_window",
        "softcap",
        "head_mask",
        "output_attentions",
        "position_ids",
        "cache_position",
        "use_cache",
        "past_key_values",
        "past_key_value",
        "position_embeddings",
        "output_router_logits",
        "output_hidden_states",
        "return_dict",
    }
)
_ORIGINAL_ATTR = "_moe_patch_cpu_attention_original"
_registered = False


class CpuAttentionStats:
    """Calls the kernel computed (tests prove the kernel path ran)."""

    calls = 0


def _eager_of(module: nn.Module) -> Callable | None:
    """The eager attention function of ``module``'s modeling file (each family has its own copy)."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _takes(module, query, key, value, dropout, kwargs) -> bool:
    """Whether the kernel computes this call (see the module doc for what goes to transformers)."""
    return (
        query.shape[2] <= MAX_QUERY_ROWS
        and not (dropout and module.training)
        and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        and query.is_cpu
        and key.is_cpu
        and value.is_cpu
        and query.dtype in FLOAT_DTYPES
        and key.dtype == value.dtype
        and key.dtype in FLOAT_DTYPES
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and key.shape[1] > 0
        and query.shape[1] % key.shape[1] == 0
        and kwargs.get("softcap") is None
        and kwargs.get("head_mask") is None
        and not kwargs.get("output_attentions")
        and (kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is None)
        and all(v is None or k in KNOWN_KWARGS for k, v in kwargs.items())
        and not _torch_only()
    )


def _compute(module, query, key, value, attention_mask, scaling, causal, s_aux, *, count=True):
    S = key.shape[2]
    mask = attention_mask[:, :, :, :S] if attention_mask is not None else None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(query, key, value, scale=scale, mask=mask, sinks=s_aux, causal=causal)
    CpuAttentionStats.calls += count
    return out, None


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' ``eager`` attention of ``module``'s family, through the kernel for decode steps."""
    if _takes(module, query, key, value, dropout, kwargs):
        # an eager mask is always given (additive, causal and padding in it)
        return _compute(module, query, key, value, attention_mask, scaling, False, kwargs.get("s_aux"))
    return _eager_of(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' ``sdpa`` attention, through the kernel for decode steps."""
    if _takes(module, query, key, value, dropout, kwargs):
        # as sdpa_attention_forward decides: without a mask, several query rows are causal unless told otherwise
        is_causal = kwargs.get("is_causal")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = query.shape[2] > 1 and attention_mask is None and bool(is_causal)
        return _compute(module, query, key, value, attention_mask, scaling, causal, kwargs.get("s_aux"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _agrees(module: nn.Module, original: str) -> bool:
    """Whether the kernel computes what ``module``'s own attention function does, on random rows of its head counts
    (a family whose function reads something of the module the kernel does not know keeps transformers')."""
    config = getattr(module, "config", None)
    hq = getattr(config, "num_attention_heads", None)
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(module, "head_dim", None)
    if not all(isinstance(n, int) and n > 0 for n in (hq, hkv, d)) or hq % hkv:
        return False
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.dtype in FLOAT_DTYPES else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, 2, d, generator=gen).to(dtype)
    k, v = (torch.randn(1, hkv, 5, d, generator=gen).to(dtype) for _ in range(2))
    keep = torch.tensor([[True, True, True, True, False], [True] * 5])[None, None]
    mask = keep if original == "sdpa" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    kwargs = {"s_aux": module.sinks} if getattr(module, "sinks", None) is not None else {}
    scaling = getattr(module, "scaling", None)
    function = sdpa_attention_forward if original == "sdpa" else _eager_of(module)
    try:
        with torch.no_grad():
            want = function(module, q, k, v, mask, scaling=scaling, dropout=0.0, **kwargs)[0]
            got = _compute(module, q, k, v, mask, scaling, False, kwargs.get("s_aux"), count=False)[0]
    except Exception as exc:  # noqa: BLE001 - any failure keeps transformers' attention
        logger.info("attention stays with transformers' %s: the self-check failed: %s", original, exc)
        return False
    tol = 1e-4 if dtype == torch.float32 else 6e-2  # a different function is off by far more (scale, sinks)
    return want.shape == got.shape and bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for original, fn in (("eager", eager_attention), ("sdpa", sdpa_attention)):
        name = IMPLEMENTATIONS[original]
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _registered = True


def install_cpu_attention(model: nn.Module) -> bool:
    """Give ``model`` the kernel-backed twin of its attention implementation (``eager`` or ``sdpa``) where the
    kernels run here and every attention module's family has the functions it wraps; returns whether it did.
    :func:`restore_cpu_attention` puts the original back."""
    from .kernels import available

    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original not in IMPLEMENTATIONS or not available() or not hasattr(model, "set_attn_implementation"):
        return False
    modules = {type(m): m for m in model.modules() if type(m).__name__.endswith("Attention")}
    if not modules or (original == "eager" and any(_eager_of(m) is None for m in modules.values())):
        return False
    disagree = [cls.__name__ for cls, m in modules.items() if not _agrees(m, original)]
    if disagree:
        logger.info("attention stays with transformers' %s: %s computes more than the kernel", original, disagree[0])
        return False
    _register()
    try:
        model.set_attn_implementation(IMPLEMENTATIONS[original])
    except (ValueError, ImportError) as exc:  # a model that refuses custom implementations keeps its own
        logger.info("attention stays with transformers' %s: %s", original, exc)
        return False
    if getattr(model.config, "_attn_implementation", None) != IMPLEMENTATIONS[original]:
        return False
    model.__dict__[_ORIGINAL_ATTR] = original
    return True


def use_cpu_attention(model: nn.Module) -> bool:
    """:func:`install_cpu_attention` with one log line saying which implementation a CPU run's attention uses."""
    if install_cpu_attention(model):
        logger.info("attention of decode steps through the CPU kernels (%s)", model.config._attn_implementation)
        return True
    return False


def restore_cpu_attention(model: nn.Module) -> None:
    """Put back the implementation :func:`install_cpu_attention` replaced (a no-op where it did not, or where the
    user has chosen another since)."""
    original = model.__dict__.pop(_ORIGINAL_ATTR, None)
    if original is not None and getattr(model.config, "_attn_implementation", None) == IMPLEMENTATIONS[original]:
        model.set_attn_implementation(original)
