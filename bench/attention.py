"""One decode step's attention call: transformers' CPU functions against the kernels' (moe_patch.cpu_attention).

    python bench/attention.py                          # gpt-oss (eager, sinks) and Qwen3 (sdpa) shapes
    python bench/attention.py --context 64,512,4096 --rounds 7

Each round times every system once per context length on the same cached keys and values (one query row, the
model's head counts), alternating; medians of the rounds are printed with the load average. The eager functions
repeat the cache per grouped query head every call, so their time grows with the context much faster than the
kernel's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import types
from functools import partial

import torch

#: (query heads, key/value heads, head size, attention implementation) of the shapes decode.py benchmarks
SHAPES = {"gpt-oss": (64, 8, 64, "eager"), "qwen3": (32, 4, 128, "sdpa")}


def _time(fn, calls: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", default="64,512,4096", help="cached tokens, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers.models.gpt_oss.modeling_gpt_oss as gpt_oss

    from moe_patch import cpu_attention

    gen = torch.Generator().manual_seed(0)
    results = {}
    for shape, (hq, hkv, d, impl) in SHAPES.items():
        module = types.SimpleNamespace(
            num_key_value_groups=hq // hkv, training=False, is_causal=True, sinks=torch.randn(hq, generator=gen)
        )
        module.sinks = module.sinks.to(torch.bfloat16) if impl == "eager" else None
        kw = {"s_aux": module.sinks} if impl == "eager" else {}
        for s in map(int, args.context.split(",")):
            q = torch.randn(1, hq, 1, d, generator=gen).to(torch.bfloat16)
            k, v = (torch.randn(1, hkv, s, d, generator=gen).to(torch.bfloat16) for _ in range(2))
            mask = torch.zeros(1, 1, 1, s, dtype=torch.bfloat16) if impl == "eager" else None
            if impl == "eager":
                stock = partial(gpt_oss.eager_attention_forward, module, q, k, v, mask, 0.125)
                ours = partial(cpu_attention.eager_attention, module, q, k, v, mask, 0.125, **kw)
            else:
                from transformers.integrations.sdpa_attention import sdpa_attention_forward

                stock = partial(sdpa_attention_forward, module, q, k, v, None, scaling=0.09)
                ours = partial(cpu_attention.sdpa_attention, module, q, k, v, None, scaling=0.09)
            calls = max(5, 20000 // s)
            rounds = {"transformers": [], "moe-patch": []}
            with torch.no_grad():
                for _ in range(args.rounds):
                    rounds["transformers"].append(_time(stock, calls))
                    rounds["moe-patch"].append(_time(ours, calls))
            med = {name: statistics.median(v) for name, v in rounds.items()}
            results[f"{shape} ({impl}) S={s}"] = {"us": med, "rounds": rounds}
            print(
                f"{shape:8s} {impl:5s} S={s:5d}: transformers {med['transformers']:8.0f} us, "
                f"moe-patch {med['moe-patch']:6.0f} us ({med['transformers'] / med['moe-patch']:.1f}x)"
            )
    load = os.getloadavg()
    print(f"threads {args.threads}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "threads": args.threads, "load": load}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
