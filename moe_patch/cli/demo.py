"""`moe-patch demo`: argument parsing and printing only (the demo itself is :mod:`moe_patch.demo`)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .args import int_at_least, new_folder


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a small random MoE checkpoint, inspect, patch, generate (no download)")
    p.add_argument(
        "--family",
        default="qwen3_moe",
        choices=("qwen3_moe", "mixtral", "deepseek_v3"),
        help="MoE family of the random checkpoint (default qwen3_moe)",
    )
    p.add_argument("--out", type=new_folder, help="where to write the demo checkpoint (default: a temporary folder)")
    p.add_argument("--tokens", type=int_at_least(1), default=32, help="tokens to generate (default 32)")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..demo import build_demo_checkpoint, run_demo
    from ..detect.table import human_count
    from .inspect import inspect_folder

    with tempfile.TemporaryDirectory(prefix="moe-patch-demo-") as tmp:
        out = args.out or Path(tmp) / f"{args.family}-random"
        print(f"1/4 building a random {args.family} checkpoint in {out}")
        build_demo_checkpoint(out, args.family)
        print("2/4 inspecting it from config.json + safetensors index (meta device, no weights read)")
        report, summary = inspect_folder(out)
        print(report)
        print(f"   checkpoint: {len(summary.shards)} shards, {summary.expert_storage}")
        print("3/4 loading, patching, generating, checking against the Hugging Face forward")
        r = run_demo(out, new_tokens=args.tokens)
        print("4/4 results")
        print(f"   logits max relative difference (fp32): {r.max_rel_logit_diff:.2e}  (bound 1e-5)")
        print(f"   greedy tokens identical over {args.tokens} tokens: {r.tokens_identical}")
        print(
            f"   prefill 4x128 tokens: reference {r.prefill_ms_reference:.1f} ms, patched "
            f"{r.prefill_ms_patched:.1f} ms "
            f"({r.prefill_ms_reference / r.prefill_ms_patched:.2f}x)"
        )
        print(
            f"   generate, per token: reference {r.decode_ms_reference:.2f} ms, patched {r.decode_ms_patched:.2f} ms "
            f"({r.decode_ms_reference / r.decode_ms_patched:.2f}x)"
        )
        print(
            f"   params: total {human_count(report.total_params)}, active per token {human_count(report.active_params)}"
        )
        ok = r.tokens_identical and r.max_rel_logit_diff <= 1e-5
    print("demo: OK" if ok else "demo: MISMATCH against the reference (please report this)")
    return 0 if ok else 1
