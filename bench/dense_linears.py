"""Decode with the dense linears' size floor as measured here against a fixed floor, in one process.

    python bench/dense_linears.py                                    # Qwen3-MoE-small shapes (attention < 1 MiB)
    python bench/dense_linears.py --shape qwen3 --systems patched    # Qwen3-30B-A3B shapes

``patch_model`` and the CPU offload engine give each plain CPU ``nn.Linear`` of at least
``dense_linears.MIN_WEIGHT_BYTES`` a forward that takes the kernels' GEMV where this machine measured it faster
(``Crossovers.linear_rows`` and ``linear_min_bytes``). Each system is loaded twice, once with the install floor
at ``--fixed`` (the 1 MiB of before the measured floor, so smaller projections stay with ``F.linear``) and once
with the package's floor; rounds alternate the two on the same tokens (bench/decode.py's checkpoint and
llama-bench's token sequence); medians and the load average are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402  (bench/decode.py: checkpoint, loading, the token sequence)

from moe_patch import dense_linears  # noqa: E402
from moe_patch.testing.synthetic import SHAPES, build_checkpoint  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-small", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--systems", default="patched,engine-cached")
    p.add_argument("--fixed", type=int, default=1 << 20, help="the fixed install floor in bytes (default 1 MiB)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workdir", default="/tmp/moe_patch_bench", help="where bench/decode.py keeps its checkpoints")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = SHAPES[args.shape]["name"].lower()
    checkpoint = build_checkpoint(Path(args.workdir) / f"{name}-shaped-{args.layers}L", args.layers, args.shape)
    package_floor = dense_linears.MIN_WEIGHT_BYTES
    models = {}
    for system in args.systems.split(","):
        for label, floor in (("fixed", args.fixed), ("measured", package_floor)):
            dense_linears.MIN_WEIGHT_BYTES = floor
            models[(system, label)] = decode._load(system, checkpoint, torch.bfloat16, None)
    dense_linears.MIN_WEIGHT_BYTES = package_floor
    tokens = decode.llama_bench_tokens(args.tokens, None)
    for model in models.values():  # warm: weights paged in, kernels and crossovers measured
        decode._decode_steps(model, tokens)
    load_before = os.getloadavg()[0]
    tok_s: dict = {key: [] for key in models}
    for _ in range(args.rounds):
        for key, model in models.items():
            t0 = time.perf_counter()
            decode._decode_steps(model, tokens)
            tok_s[key].append(len(tokens) / (time.perf_counter() - t0))
    print(
        f"{args.shape}, {args.layers} layers, {args.tokens} decode steps, {args.threads} threads, medians of "
        f"{args.rounds} alternating rounds; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"| system | floor {args.fixed} B, tok/s | measured floor (from {package_floor} B), tok/s | ratio |")
    print("|---|---|---|---|")
    for system in args.systems.split(","):
        fixed, measured = (statistics.median(tok_s[(system, label)]) for label in ("fixed", "measured"))
        print(f"| {system} | {fixed:.1f} | {measured:.1f} | {measured / fixed:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
