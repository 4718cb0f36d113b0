"""Overhead of the routing monitor on a forward: the same patched model with and without it, same run.

    ./dev bench monitor_overhead                    # 3 shapes, 512 tokens, CPU (about 2 minutes on 2 cores)
    python bench/monitor_overhead.py --quick         # one small shape, a smoke run
    python bench/monitor_overhead.py --out bench-results/monitor.json

Each shape is a whole causal LM (2 MoE layers, hidden 1024 with each family's expert count, top-k and
intermediate ratio, vocabulary 1024) patched by ``moe_patch.patch_model``, run on ``--tokens`` tokens in
fp32 under ``torch.no_grad``. Three variants are timed in interleaved rounds, so machine load drifts hit
them alike: no monitor, the monitor with router statistics (entropy, z-loss, top-k probability from the
router logits: the default) and the monitor with counts only. Figures are medians; the overhead is
median(with) / median(without) - 1 (and the same with minimums, less sensitive to a busy machine).
Target (issue 14): under 3% at 512 tokens on CPU.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # bench/ shadows stdlib names

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import moe_patch
from moe_patch.atomic import write_bytes
from moe_patch.testing.tiny import tiny_config

SHAPES = {
    # name: (model_type, hidden, config overrides) -- hidden scaled to 1024 as in bench/dispatch.py
    "Mixtral-like (8 experts, top-2)": ("mixtral", 1024, dict(intermediate_size=3584, num_local_experts=8)),
    "Qwen3-MoE-like (128 experts, top-8)": (
        "qwen3_moe",
        1024,
        dict(moe_intermediate_size=384, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    ),
    "small Mixtral (hidden 256)": ("mixtral", 256, dict(intermediate_size=896, num_local_experts=8)),
}
QUICK = ("small Mixtral (hidden 256)",)
VARIANTS = ("off", "monitor", "monitor (counts only)")


def build(model_type: str, hidden: int, overrides: dict):
    from transformers import AutoModelForCausalLM

    config = tiny_config(
        model_type,
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
        num_key_value_heads=4,
        head_dim=64,
        vocab_size=1024,
        max_position_embeddings=4096,
        **overrides,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    moe_patch.patch_model(model)
    return model


def time_shape(name: str, tokens: int, rounds: int) -> dict:
    model_type, hidden, overrides = SHAPES[name]
    model = build(model_type, hidden, overrides)
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def run(variant: str) -> float:
        mon = None
        if variant != "off":
            mon = moe_patch.monitor(model, router_stats=variant == "monitor")
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model(input_ids=ids)
                elapsed = time.perf_counter() - t0
            if mon is not None:
                mon.report()  # read back outside the timed forward, as a user would
        finally:
            if mon is not None:
                mon.close()
        return elapsed

    for v in VARIANTS:  # warm-up
        run(v)
    for r in range(rounds):
        order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            times[v].append(run(v))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    best = {v: min(ts) for v, ts in times.items()}
    return {
        "shape": name,
        "tokens": tokens,
        "rounds": rounds,
        "median_s": med,
        "min_s": best,
        "overhead": {v: med[v] / med["off"] - 1 for v in VARIANTS if v != "off"},
        "overhead_of_minimums": {v: best[v] / best["off"] - 1 for v in VARIANTS if v != "off"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None)
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK[0]}, 3 rounds")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (list(QUICK) if args.quick else list(SHAPES))
    rounds = 3 if args.quick else args.rounds
    results = [time_shape(s, args.tokens, rounds) for s in shapes]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print(
        "| shape | tokens | forward ms (no monitor) | with monitor | overhead (medians / minimums) "
        "| counts only | overhead (medians / minimums) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m, o, ob = r["median_s"], r["overhead"], r["overhead_of_minimums"]
        full, counts = "monitor", "monitor (counts only)"
        print(
            f"| {r['shape']} | {r['tokens']} | {1e3 * m['off']:.1f} | {1e3 * m[full]:.1f} | "
            f"{100 * o[full]:+.2f}% / {100 * ob[full]:+.2f}% | {1e3 * m[counts]:.1f} | "
            f"{100 * o[counts]:+.2f}% / {100 * ob[counts]:+.2f}% |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(
            args.out,
            json.dumps(
                {"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}, indent=2
            ).encode(),
        )


if __name__ == "__main__":
    main()
