"""Stored bytes per second through the native CPU expert kernels, against DRAM and torch, in one run.

    ./dev bench kernels                        # both layer shapes, every format, 1/2/4/8 rows per expert
    ./dev bench kernels --shape gpt-oss-20b --formats mxfp4 --rounds 5
    ./dev bench kernels --rows 1,8,16,64,256   # also prefill row counts (kernel vs decode + torch GEMM)
    ./dev bench kernels --json results.json

One MoE layer of a real model's shape, random weights, stored in each format (a layer is larger than the
last-level cache: gpt-oss-20b MXFP4 is 423 MB, Qwen3-30B-A3B bf16 1.2 GB). Each call routes R tokens to
the same top-k experts (R rows per expert), and successive calls walk through all experts, so every call
reads its weights from DRAM. Per (format, R), in the same interleaved rounds:

- ``kernel``: ``MoEKernel.forward`` (bf16 activations: gate_up, activation, down and the weighted sum);
- ``torch_decode``: for quantized formats, each expert decoded to bf16 by the torch decoders
  (moe_patch/formats/{fp8,mxfp4,compressed}.py) into a reused buffer, then ``F.linear`` (the path the kernels replace);
- ``torch_bf16``: for bf16 weights, plain torch ``F.linear`` per expert (``x @ W.T``);

and the machine's DRAM read bandwidth (torch sum over 1 GiB, all threads). Figures are GB/s of stored
bytes (weights, scales and zero points of the k experts; 1 GB = 1e9 B) per call, the median over rounds of
each round's median; the load average is recorded. ``best`` columns are the fastest single call (and the
fastest DRAM read): on a machine shared with other work they show what an undisturbed call reaches, since
a multi-threaded call waits for its slowest thread whenever the scheduler takes a core away.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_patch import kernels
from moe_patch.formats.compressed import dequantize_int
from moe_patch.formats.fp8 import dequantize_fp8
from moe_patch.formats.mxfp4 import dequantize_mxfp4
from moe_patch.kernels import ExpertFormat, ExpertWeights, MoEKernel, MoELayerSpec

SHAPES = {  # name: (hidden, expert intermediate, experts, top-k)
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
}
FORMATS = {
    "bf16": ExpertFormat("bf16"),
    "fp8": ExpertFormat("fp8", block=(128, 128)),
    "mxfp4": ExpertFormat("mxfp4"),
    "int4": ExpertFormat("int4", group_size=32, scale_dtype=torch.bfloat16),
    "int8": ExpertFormat("int8", scale_dtype=torch.bfloat16),
}


# --------------------------------------------------------------------------- random stored experts (fast)
def _stored(kind: str, fmt: ExpertFormat, rows: int, cols: int, gen: torch.Generator) -> dict:
    """One projection of one expert: random bytes in the format's layout, values of a realistic range."""
    if kind == "bf16":  # random signs and mantissas, exponents of 2**-7 .. 2**-6
        bits = torch.randint(0, 1 << 16, (rows, cols), dtype=torch.int32, generator=gen)
        return {"w": ((bits & 0x807F) | 0x3C00).to(torch.int16).view(torch.bfloat16)}
    if kind == "fp8":  # normal weights quantized per 128x128 block as checkpoints are (uniform random bytes
        # would make 5% of all codes subnormal, where trained weights have about 0.01%)
        from moe_patch.testing.quantized import quantize_fp8_block

        w = torch.randn(rows, cols, generator=gen) * 0.02
        q, s = quantize_fp8_block(w, (128, 128), "float")
        return {"w": q, "s": s}
    if kind == "mxfp4":
        return {
            "w": torch.randint(0, 256, (rows, cols // 32, 16), dtype=torch.uint8, generator=gen),
            "s": torch.randint(118, 124, (rows, cols // 32), dtype=torch.uint8, generator=gen),
        }
    words = cols // 8 if kind == "int4" else cols // 4
    w = torch.randint(-(1 << 31), (1 << 31) - 1, (rows, words), dtype=torch.int32, generator=gen)
    groups = cols // fmt.group_size if fmt.group_size else 1
    return {"w": w, "s": (torch.rand(rows, groups, generator=gen) * 1e-2 + 1e-3).to(torch.bfloat16)}


def _nbytes(d: dict) -> int:
    return sum(t.numel() * t.element_size() for t in d.values())


def _decode(kind: str, fmt: ExpertFormat, d: dict, rows: int, cols: int, out: torch.Tensor) -> torch.Tensor:
    if kind == "fp8":
        return dequantize_fp8(d["w"], d["s"], fmt.block, torch.bfloat16, out=out)
    if kind == "mxfp4":
        return dequantize_mxfp4(d["w"], d["s"], torch.bfloat16, out=out)
    bits = 4 if kind == "int4" else 8
    return dequantize_int(
        d["w"], d["s"], None, bits=bits, group_size=fmt.group_size, shape=(rows, cols), dtype=torch.bfloat16, out=out
    )


class Layer:
    """One layer of ``shape`` stored as ``kind``, and the calls that compute it."""

    def __init__(self, shape: str, kind: str, seed: int = 0):
        self.hidden, self.inter, self.experts, self.top_k = SHAPES[shape]
        self.kind, self.fmt = kind, FORMATS[kind]
        gen = torch.Generator().manual_seed(seed)
        self.gu = [_stored(kind, self.fmt, 2 * self.inter, self.hidden, gen) for _ in range(self.experts)]
        self.dn = [_stored(kind, self.fmt, self.hidden, self.inter, gen) for _ in range(self.experts)]
        self.expert_bytes = _nbytes(self.gu[0]) + _nbytes(self.dn[0])
        spec = MoELayerSpec(self.experts, self.hidden, self.inter, self.fmt, self.fmt)
        self.kernel = MoEKernel(spec)
        for e in range(self.experts):
            self.kernel.set_expert(
                e, ExpertWeights(self.gu[e]["w"], self.dn[e]["w"], self.gu[e].get("s"), self.dn[e].get("s"))
            )
        self.scratch = (
            torch.empty(2 * self.inter, self.hidden, dtype=torch.bfloat16),
            torch.empty(self.hidden, self.inter, dtype=torch.bfloat16),
        )
        self._next = 0

    @property
    def layer_bytes(self) -> int:
        return self.experts * self.expert_bytes

    def experts_of_next_call(self) -> list[int]:
        """The next k experts in a walk through all of them: each call reads what the last ones evicted."""
        ids = [(self._next + j) % self.experts for j in range(self.top_k)]
        self._next = (self._next + self.top_k) % self.experts
        return ids

    def kernel_call(self, x: torch.Tensor, out: torch.Tensor):
        ids = torch.tensor(self.experts_of_next_call()).expand(x.shape[0], self.top_k).contiguous()
        wts = torch.full((x.shape[0], self.top_k), 1.0 / self.top_k)
        return lambda: self.kernel.forward(x, ids, wts, out)

    def torch_call(self, x: torch.Tensor, out: torch.Tensor):
        ids = self.experts_of_next_call()

        def run():
            out.zero_()
            for e in ids:
                if self.kind == "bf16":
                    wg, wd = self.gu[e]["w"], self.dn[e]["w"]
                else:
                    wg = _decode(self.kind, self.fmt, self.gu[e], 2 * self.inter, self.hidden, self.scratch[0])
                    wd = _decode(self.kind, self.fmt, self.dn[e], self.hidden, self.inter, self.scratch[1])
                gate, up = F.linear(x, wg).chunk(2, dim=-1)
                out.add_(F.linear(F.silu(gate) * up, wd), alpha=1.0 / self.top_k)

        return run


# --------------------------------------------------------------------------- timing
def dram_read_times(rounds: int = 5) -> list[float]:
    """Seconds of torch's sum over 1 GiB of float32 on all threads (the read bandwidth), ``rounds`` times."""
    a = torch.ones(1 << 28, dtype=torch.float32)
    a.sum()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return times


def _call_times(make, calls: int) -> list[float]:
    """Seconds of ``calls`` calls, each built by ``make()`` (next experts) outside the timing."""
    fns = [make() for _ in range(calls + 1)]
    fns[0]()  # warm-up: first-touch of scratch, workspace growth
    times = []
    for fn in fns[1:]:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run(shapes: list[str], formats: list[str], rows: list[int], rounds: int, calls: int) -> dict:
    results: dict = {}
    for shape in shapes:
        results[shape] = {}
        layers = {}
        for kind in formats:
            layers[kind] = Layer(shape, kind)
            print(
                f"{shape} {kind}: layer {layers[kind].layer_bytes / 1e6:.0f} MB, {layers[kind].kernel.variants[0]}",
                flush=True,
            )
        hidden = SHAPES[shape][0]
        samples = {(k, r, s): [] for k in formats for r in rows for s in ("kernel", "torch")}
        best = {(k, r): math.inf for k in formats for r in rows}
        dram, dram_best = [], math.inf
        for rnd in range(rounds):  # interleaved: machine load drifts hit every system alike
            times = dram_read_times(3)
            dram.append(statistics.median(times))
            dram_best = min(dram_best, *times)
            for r in rows:
                x = torch.randn(r, hidden).to(torch.bfloat16)
                out = torch.empty(r, hidden, dtype=torch.bfloat16)
                for kind in formats:
                    layer = layers[kind]
                    times = _call_times(lambda layer=layer, x=x, out=out: layer.kernel_call(x, out), calls)
                    samples[(kind, r, "kernel")].append(statistics.median(times))
                    best[(kind, r)] = min(best[(kind, r)], *times)
                    if r <= 64 or rnd == 0:  # torch at large row counts is slow: once is enough for a ratio
                        samples[(kind, r, "torch")].append(
                            statistics.median(
                                _call_times(lambda layer=layer, x=x, out=out: layer.torch_call(x, out), 3)
                            )
                        )
            print(f"  round {rnd + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)
        bw = 2**30 / statistics.median(dram) / 1e9
        bw_best = 2**30 / dram_best / 1e9
        for kind in formats:
            per_call = layers[kind].expert_bytes * layers[kind].top_k
            entry = {"stored_bytes_per_call": per_call, "layer_bytes": layers[kind].layer_bytes, "rows": {}}
            for r in rows:
                k_s = statistics.median(samples[(kind, r, "kernel")])
                t_s = statistics.median(samples[(kind, r, "torch")])
                entry["rows"][r] = {
                    "kernel_ms": k_s * 1e3,
                    "kernel_gbps": per_call / k_s / 1e9,
                    "kernel_of_dram": per_call / k_s / 1e9 / bw,
                    "kernel_best_gbps": per_call / best[(kind, r)] / 1e9,
                    "kernel_best_of_dram_best": per_call / best[(kind, r)] / 1e9 / bw_best,
                    "torch_ms": t_s * 1e3,
                    "torch_gbps": per_call / t_s / 1e9,
                    "torch_path": "bf16 F.linear" if kind == "bf16" else "torch decode to bf16 + F.linear",
                    "kernel_vs_torch": t_s / k_s,
                }
            one = entry["rows"].get(1)
            if one:
                for e in entry["rows"].values():
                    e["of_1_row_bytes_per_s"] = e["kernel_gbps"] / one["kernel_gbps"]
            results[shape][kind] = entry
        results[shape]["dram_read_gbps"] = bw
        results[shape]["dram_read_best_gbps"] = bw_best
        del layers
    return results


def _table(results: dict) -> None:
    for shape, per in results.items():
        print(
            f"\n{shape}: DRAM read {per['dram_read_gbps']:.1f} GB/s (median), {per['dram_read_best_gbps']:.1f} (best)"
        )
        print(
            f"{'format':6} {'rows':>5} {'kernel GB/s':>12} {'of DRAM':>8} {'of 1-row':>9} {'torch GB/s':>11} "
            f"{'kernel/torch':>13} {'best GB/s':>10} {'best/best':>10}"
        )
        for kind, entry in per.items():
            if not isinstance(entry, dict):
                continue
            for r, e in entry["rows"].items():
                print(
                    f"{kind:6} {r:>5} {e['kernel_gbps']:>12.1f} {e['kernel_of_dram']:>8.2f} "
                    f"{e.get('of_1_row_bytes_per_s', float('nan')):>9.2f} {e['torch_gbps']:>11.2f} "
                    f"{e['kernel_vs_torch']:>12.1f}x {e['kernel_best_gbps']:>10.1f} "
                    f"{e['kernel_best_of_dram_best']:>10.2f}"
                )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=list(SHAPES), action="append", help="layer shape (default: both)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated: " + ", ".join(FORMATS))
    p.add_argument("--rows", default="1,2,4,8", help="rows per expert, comma-separated (default 1,2,4,8)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=9, help="timed calls per system per round")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's, all cores)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        p.error(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(FORMATS)}")
    rows = [int(r) for r in args.rows.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    status = kernels.status()
    if not status.available:
        raise SystemExit(f"kernels not available: {status.reason}")
    load_before = os.getloadavg()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"kernel variants {', '.join(status.variants)}, load average {load_before[0]:.2f}",
        flush=True,
    )
    results = run(args.shape or list(SHAPES), formats, rows, args.rounds, args.calls)
    load_after = os.getloadavg()
    _table(results)
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    if args.json:
        meta = {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "variants": status.variants,
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "rounds": args.rounds,
            "calls": args.calls,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
