"""Time one MoE block: moe-patch vs transformers' own experts implementations, in the same run.

    ./dev bench dispatch            # full grid (about 10 minutes on 2 cores)
    ./dev bench dispatch --quick    # 2 shapes, fp32 only, a smoke run
    python bench/dispatch.py --device cuda --full-size   # on a GPU: real hidden sizes, also batched_mm

Blocks with transformers' experts decorator are timed with ``eager``, ``grouped_mm`` (the default)
and ``moe_patch``; Llama 4 (dense over all experts) and a ModuleList block (4.x style, a Python loop
over experts) against their own forward. Rounds interleave the implementations so machine load
drifts hit all of them alike; each figure is the median of the rounds. Hidden sizes are scaled to
1024 (intermediate sizes keep each model's ratio, experts and top-k are the real ones): the full
shapes need 6-45 GB per block and minutes per bf16 prefill on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from moe_patch import patch_model
from moe_patch.families.fused import register_experts_implementation
from moe_patch.validation import VALIDATE_ATTR

SHAPES = {
    # name: (model_type, hidden, intermediate, experts, top_k); real hidden in the comment
    "Mixtral-8x7B": ("mixtral", 1024, 3584, 8, 2),  # 4096 / 14336
    "Qwen3-30B-A3B": ("qwen3_moe", 1024, 384, 128, 8),  # 2048 / 768
    "DeepSeek-V3": ("deepseek_v3", 1024, 288, 256, 8),  # 7168 / 2048 (288: bf16 grouped_mm needs 16-byte strides)
    "Llama-4-Scout (dense loop)": ("llama4", 1024, 1024, 16, 1),  # 5120 / 8192
    "ModuleList (4.x Mixtral)": ("legacy", 1024, 3584, 8, 2),
}
TOKENS = (1, 4, 32, 512)
FULL_SIZE = {  # the real (hidden, intermediate), for a GPU
    "Mixtral-8x7B": (4096, 14336),
    "Qwen3-30B-A3B": (2048, 768),
    "DeepSeek-V3": (7168, 2048),
    "Llama-4-Scout (dense loop)": (5120, 8192),
    "ModuleList (4.x Mixtral)": (4096, 14336),
}


def _block(model_type: str, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, device: str):
    """One MoE block with random weights, and the callable that runs it (built on ``device``: full sizes
    are tens of GB)."""
    torch.manual_seed(0)
    with torch.device(device):
        return _build_block(model_type, hidden, inter, experts, top_k, dtype, device)


def _build_block(model_type, hidden, inter, experts, top_k, dtype, device):
    if model_type == "legacy":
        from moe_patch.testing.legacy import LegacyMoeConfig, MixtralStyleBlock

        block = MixtralStyleBlock(
            LegacyMoeConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k)
        )
        config = None
    elif model_type == "llama4":
        from transformers import Llama4TextConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

        config = Llama4TextConfig(
            hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k
        )
        block = Llama4TextMoe(config)
    else:
        from moe_patch.testing.tiny import tiny_config

        kw = {
            "mixtral": dict(intermediate_size=inter, num_local_experts=experts),
            "qwen3_moe": dict(moe_intermediate_size=inter, num_experts=experts, norm_topk_prob=True),
            "deepseek_v3": dict(
                moe_intermediate_size=inter, n_routed_experts=experts, n_group=8, topk_group=4, n_shared_experts=1
            ),
        }[model_type]
        config = tiny_config(model_type, hidden_size=hidden, num_experts_per_tok=top_k, **kw)
        from transformers import AutoModelForCausalLM

        block = AutoModelForCausalLM.from_config(config).model.layers[-1].mlp
        config = block.experts.config  # the object the experts read their implementation from
    block = block.to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block, config


def _time(fn, x) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def bench_point(
    name: str, dtype: torch.dtype, tokens: int, rounds: int, device: str = "cpu", full_size: bool = False
) -> dict:
    model_type, hidden, inter, experts, top_k = SHAPES[name]
    if full_size:
        hidden, inter = FULL_SIZE[name]
    block, config = _block(model_type, hidden, inter, experts, top_k, dtype, device)
    x = torch.randn(1, tokens, hidden, dtype=dtype, device=device)
    holder = nn.Sequential(block)  # patch_model walks a model; this one holds the block
    times: dict[str, list[float]] = {}

    def run(impl: str) -> None:
        if config is not None and impl not in ("reference", "moe_patch-module"):
            config._experts_implementation_internal = impl.replace("-nocheck", "")
            setattr(block.experts, VALIDATE_ATTR, not impl.endswith("-nocheck"))
        try:
            times.setdefault(impl, []).append(_time(holder, x))
        except torch.OutOfMemoryError:  # batched_mm gathers a weight copy per token: 224 GiB for Mixtral x 32
            times[impl].append(float("nan"))
            torch.cuda.empty_cache()

    impls = ["eager", "grouped_mm", "moe_patch"] if config is not None and model_type != "llama4" else ["reference"]
    if impls != ["reference"]:
        impls.append("moe_patch-nocheck")  # the routing check (one host read per block) timed apart
    if device == "cuda" and impls != ["reference"]:
        impls[2:2] = ["batched_mm"]
    register_experts_implementation()
    with torch.inference_mode():
        for impl in impls:  # warm-up
            run(impl)
        times.clear()
        if impls == ["reference"]:
            for _ in range(rounds):
                run("reference")
            patch_model(holder, validate=False)
            run("moe_patch-module")
            times.pop("moe_patch-module")
            for _ in range(rounds):
                run("moe_patch-module")
        else:
            for _ in range(rounds):
                for impl in impls:
                    run(impl)
    med = {k: statistics.median(v) for k, v in times.items()}
    if "moe_patch-module" in med:
        med["moe_patch"] = med.pop("moe_patch-module")
    best_builtin = min(v for k, v in med.items() if not k.startswith("moe_patch") and v == v)  # v == v: not NaN
    stock = med.get("grouped_mm", med.get("reference"))  # what a stock model runs: the default, or its own forward
    return {
        "shape": name,
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": tokens,
        "ms": med,
        "speedup_vs_best_builtin": best_builtin / med["moe_patch"],
        "speedup_vs_stock": stock / med["moe_patch"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, fp32, fewer rounds")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="only these shapes")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], help="only these dtypes")
    ap.add_argument("--tokens", nargs="+", type=int, help=f"only these token counts (default {TOKENS})")
    ap.add_argument("--out", default="bench/results/dispatch.json")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--full-size", action="store_true", help="real hidden/intermediate sizes (GPU memory needed)")
    args = ap.parse_args()
    shapes = args.shapes or (["Mixtral-8x7B", "ModuleList (4.x Mixtral)"] if args.quick else list(SHAPES))
    dtypes = (
        [getattr(torch, d) for d in args.dtypes]
        if args.dtypes
        else ([torch.float32] if args.quick else [torch.float32, torch.bfloat16])
    )
    rows = []
    if args.device == "cuda":
        print(
            f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"{'full' if args.full_size else 'scaled'} sizes"
        )
    print(f"load average {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} threads")
    print(
        "| shape | dtype | tokens | eager / grouped_mm / batched_mm / reference ms | moe-patch ms | vs stock | "
        "vs best built-in |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in shapes:
        for dtype in dtypes:
            for tokens in args.tokens or TOKENS:
                rounds = args.rounds if tokens < 512 else max(3, args.rounds // 2)
                r = bench_point(name, dtype, tokens, 3 if args.quick else rounds, args.device, args.full_size)
                rows.append(r)
                base = " / ".join(
                    f"{r['ms'][k]:.3f}" for k in ("eager", "grouped_mm", "batched_mm", "reference") if k in r["ms"]
                )
                mp = f"{r['ms']['moe_patch']:.3f}" + (
                    f" ({r['ms']['moe_patch-nocheck']:.3f} unchecked)" if "moe_patch-nocheck" in r["ms"] else ""
                )
                print(
                    f"| {name} | {r['dtype']} | {tokens} | {base} | {mp} | {r['speedup_vs_stock']:.2f}x | "
                    f"{r['speedup_vs_best_builtin']:.2f}x |",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    worst = min(rows, key=lambda r: r["speedup_vs_stock"])
    print(
        f"\nworst point: {worst['shape']} {worst['dtype']} {worst['tokens']} tokens: "
        f"{worst['speedup_vs_stock']:.2f}x of stock (the default implementation); load average "
        f"{os.getloadavg()[0]:.2f} at the end"
    )


if __name__ == "__main__":
    main()
