"""PATH and how its experts are paged: the loading arguments that ``run``, ``serve`` and ``chat`` share, and
:func:`load_offloaded`, which turns them into a model.

Defaults are for someone who wants the model to fit: ``--device auto`` (CUDA when torch sees a GPU) and
``--expert-cache auto`` (the device's free memory less the rest of the run and headroom:
:mod:`moe_patch.offload.auto_budget`, the chosen size printed when the model loads).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import device, int_at_least, size


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    """PATH and how its experts are paged: the arguments of ``run``, ``serve`` and ``chat``."""
    p.add_argument("path", help="checkpoint directory or Hub repo id")
    p.add_argument(
        "--expert-cache",
        type=size(auto=True),
        default="auto",
        help="device-cache budget, e.g. 8GiB (default auto: the device's free memory less the non-expert "
        "weights, the KV cache and activations for the context, and 10%% headroom; printed when chosen)",
    )
    p.add_argument("--host-cache", type=size(), default="0", help="host-RAM cache budget, e.g. 32GiB (default 0: off)")
    p.add_argument(
        "--device",
        type=device,
        default="auto",
        help="auto (default: cuda when torch sees a GPU, else cpu), cpu or cuda[:n]",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype (default auto: the checkpoint's)",
    )
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="keep experts quantized in the caches")
    p.add_argument("--policy", choices=["lru", "lfu", "pinned-hot"], default="lru")
    p.add_argument("--no-prefetch", action="store_true", help="switch the next-layer prefetch off")
    p.add_argument(
        "--direct-io",
        choices=["auto", "always", "never"],
        default="auto",
        help="read experts past the page cache (O_DIRECT); auto (default): when the checkpoint's experts are "
        "larger than the memory the page cache could still take",
    )
    p.add_argument(
        "-t",
        "--threads",
        type=int_at_least(1),
        default=None,
        help="CPU threads for computation (default: torch's, one per core)",
    )


def resolve_device(text: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else as given."""
    if text != "auto":
        return text
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def offload_options(args: argparse.Namespace, context_tokens: int | None = None):
    """The :class:`~moe_patch.offload.OffloadOptions` the arguments of :func:`add_offload_arguments` give;
    ``context_tokens``: the context ``--expert-cache auto`` leaves room for (default: the model's, capped).
    ``--threads`` takes effect here, before anything is loaded or calibrated."""
    from ..offload.options import OffloadOptions

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    return OffloadOptions(
        device=args.device,
        expert_cache=args.expert_cache,
        host_cache=args.host_cache,
        quantize_experts=args.quantize,
        prefetch=not args.no_prefetch,
        policy=args.policy,
        context_tokens=context_tokens,
        direct_io=getattr(args, "direct_io", "auto"),
    )


def load_offloaded(args: argparse.Namespace, path: str | Path | None = None, context_tokens: int | None = None):
    """The model of ``path`` (default ``args.path``) with its experts offloaded as the arguments of
    :func:`add_offload_arguments` say."""
    from ..offload import load_model

    options = offload_options(args, context_tokens)
    return load_model(args.path if path is None else path, options=options, dtype=args.dtype)
