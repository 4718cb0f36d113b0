"""PATH and how its experts are paged: the loading arguments that ``run``, ``serve`` and ``chat`` share, and
:func:`load_offloaded`, which turns them into a model."""

from __future__ import annotations

import argparse

from .args import device, size


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    """PATH and how its experts are paged: the arguments of ``run``, ``serve`` and ``chat``."""
    p.add_argument("path", help="checkpoint directory or Hub repo id")
    p.add_argument("--expert-cache", type=size(), default=None, help="device-cache budget, e.g. 8GiB (default: no limit)")
    p.add_argument("--host-cache", type=size(), default="0", help="host-RAM cache budget, e.g. 32GiB (default 0: off)")
    p.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:n] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default auto: the checkpoint's)")
    p.add_argument("--quantize", choices=["nf4", "int8"], default=None, help="keep experts quantized in the caches")
    p.add_argument("--policy", choices=["lru", "lfu", "pinned-hot"], default="lru")
    p.add_argument("--no-prefetch", action="store_true", help="switch the next-layer prefetch off")


def offload_options(args: argparse.Namespace):
    """The :class:`~moe_patch.offload.OffloadOptions` the arguments of :func:`add_offload_arguments` give."""
    from ..offload.options import OffloadOptions

    return OffloadOptions(
        device=args.device, expert_cache=args.expert_cache, host_cache=args.host_cache,
        quantize_experts=args.quantize, prefetch=not args.no_prefetch, policy=args.policy,
    )


def load_offloaded(args: argparse.Namespace):
    """The model of ``args.path`` with its experts offloaded as the arguments of :func:`add_offload_arguments` say."""
    from ..offload import load_model

    return load_model(args.path, options=offload_options(args), dtype=args.dtype)
