"""Offloaded decode: moe-patch vs transformers + accelerate disk offload at the same memory budget.

Builds (once) a random-weight bf16 checkpoint with Qwen3-30B-A3B layer shapes (hidden 2048,
128 experts x moe_intermediate 768, top-8, 32 query / 4 KV heads of 128) and fewer layers,
saved like the real one (per-expert ``mlp.experts.N.{gate,up,down}_proj.weight`` keys, one shard
per layer). Then runs each system in its own subprocess (so peak RSS is its own), greedy decoding
from the same prompt, and reports decode tokens/s (median of --runs), peak RSS, and for
moe-patch the hit rate and the decode time against the bandwidth bound of DESIGN.md section 5.

    python bench/offload.py --layers 4 --budget 1GiB --new-tokens 6 --runs 3
    python bench/offload.py --device cuda --layers 24 --budget 8GiB --host-cache 24GiB   # on a GPU

moe-patch gets ``expert_cache=budget``; accelerate gets ``max_memory={"cpu": non-expert + budget}``
with an ``offload_folder``. Each system runs in a cgroup-v1 memory group (root only; ``--cgroup-limit``)
that caps RAM *and page cache* at non-expert + budget + one layer of experts + 1 GiB, so neither
can keep the "disk" tier in the OS page cache; the checkpoint's pages are also dropped
(posix_fadvise DONTNEED) before each system starts. Compute is fp32 by default, the fastest dtype
on CPU (bf16 GEMV is ~8x slower there).

With ``--device cuda`` the budget is GPU memory for experts (moe-patch ``expert_cache``; accelerate
``max_memory={0: non-expert + budget, "cpu": host cache}``), ``--host-cache`` the host RAM tier
(pinned), compute is bf16, and the report adds the DESIGN.md section 5 bound
``(1 - h) B / (BW_pcie + BW_dram)`` from the measured hit rate and bandwidths.
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (inspect.py); never import them as modules
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from moe_patch.testing.synthetic import (  # noqa: E402
    FORMAT_SHAPES,
    SHAPES,
    build_checkpoint,
    build_quantized,
    drop_page_cache,
    peak_rss_bytes,
)


def _timed_generate(model, ids, new_tokens: int) -> tuple[list[int], float, list[float]]:
    """Greedy generation; returns tokens, prefill seconds and each decode step's seconds."""
    times: list[float] = []
    state = {}

    def pre(m, a, k):
        state["t0"] = time.perf_counter()

    def post(m, a, k, o):
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - state["t0"])

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
    finally:
        h1.remove()
        h2.remove()
    return out[0, ids.shape[1] :].tolist(), times[0], times[1:]


def worker(args) -> dict:
    torch.set_num_threads(os.cpu_count() or 2)
    path = Path(args.checkpoint)
    drop_page_cache(path)
    from moe_patch.offload.budget import parse_bytes

    budget = parse_bytes(args.budget)
    dtype = getattr(torch, args.dtype)
    ids = torch.randint(1, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(0)).to(args.device)
    host_cache = parse_bytes(args.host_cache)
    t0 = time.perf_counter()
    result: dict = {"system": args.worker}
    if args.worker in ("moe-patch", "moe-patch-bf16"):
        import moe_patch
        from moe_patch.offload import OffloadOptions, get_offload_handle

        options = OffloadOptions(
            device=args.device,
            expert_cache=budget,
            host_cache=host_cache,
            prefetch=not args.no_prefetch,
            cpu_compute=args.cpu_compute,
        )
        model = moe_patch.load_model(path, dtype=dtype, options=options)
        handle = get_offload_handle(model)
    elif args.worker == "resident":  # the floor: every expert in memory on the device (when it fits)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=args.device)
        handle = None
    elif args.worker == "dequantize":  # stock transformers on a quantized checkpoint: every expert dequantized
        from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

        qc = (Mxfp4Config if args.format == "mxfp4" else FineGrainedFP8Config)(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=args.device, quantization_config=qc)
        model = model.to(dtype)  # its FP8 loader leaves the unquantized bf16 tensors in bf16
        handle = None
    else:
        from transformers import AutoModelForCausalLM

        folder = Path(args.workdir) / "accelerate_offload"
        shutil.rmtree(folder, ignore_errors=True)
        non_expert = args.non_expert_bytes
        max_memory = (
            {0: non_expert + budget, "cpu": host_cache} if args.device == "cuda" else {"cpu": non_expert + budget}
        )
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            device_map="auto",
            max_memory=max_memory,
            offload_folder=str(folder),
        )
        result["device_map_disk_modules"] = sum(1 for v in model.hf_device_map.values() if v == "disk")
        handle = None
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load"] = peak_rss_bytes()
    runs = []
    for r in range(args.runs):
        last = r == args.runs - 1
        if handle is not None and last:
            handle.reset_stats()  # statistics of the last run only
        if args.profile and last:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
        tokens, prefill, decode = _timed_generate(model, ids, args.new_tokens)
        if args.profile and last:
            prof.disable()
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        runs.append({"prefill_s": prefill, "decode_s": decode, "tokens": tokens})
    per_run_tps = [len(r["decode_s"]) / sum(r["decode_s"]) for r in runs]
    result.update(
        decode_tok_s=statistics.median(per_run_tps),
        decode_tok_s_runs=per_run_tps,
        prefill_s=statistics.median(r["prefill_s"] for r in runs),
        tokens=runs[-1]["tokens"],
        peak_rss=peak_rss_bytes(),
        cgroup_peak=_cgroup_peak(),
    )
    if handle is not None:
        st = handle.stats
        result["stats"] = st.to_dict()
        result["stats_text"] = str(st)
        bw = st.bandwidths
        if args.device == "cuda" and bw is not None:
            # DESIGN.md section 5, best split of the misses between PCIe copies and CPU compute
            shp = SHAPES[args.shape]
            routed = args.layers * shp["top_k"] * st.stored_expert_bytes
            result["design_bound_s"] = (1 - st.hit_rate) * routed / (bw.h2d + bw.dram)
            result["bandwidths"] = bw.as_dict()
    if args.device == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated()
        result["gpu"] = torch.cuda.get_device_name()
    return result


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def _cgroup_peak() -> int | None:
    """Peak memory (anonymous + page cache) of this process's memory cgroup, when the bench made one."""
    name = os.environ.get("MOE_BENCH_CGROUP")
    f = CGROUP_ROOT / name / "memory.max_usage_in_bytes" if name else None
    return int(f.read_text()) if f is not None and f.exists() else None


def _make_cgroup(name: str, limit: int) -> str | None:
    """A cgroup-v1 memory group capping anonymous memory *and page cache* (needs root); None if unavailable."""
    d = CGROUP_ROOT / name
    try:
        d.mkdir(exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        return name
    except OSError:
        return None


def run_worker(system: str, args, non_expert: int) -> dict:
    checkpoint = args.bf16_checkpoint if system in ("moe-patch-bf16", "accelerate", "resident") else args.checkpoint
    cmd = (
        [
            sys.executable,
            __file__,
            "--dtype",
            args.dtype,
            "--device",
            args.device,
            "--host-cache",
            args.host_cache,
            "--cpu-compute",
            args.cpu_compute,
            "--layers",
            str(args.layers),
            "--format",
            args.format,
            "--shape",
            args.shape,
        ]
        + (["--profile"] if args.profile else [])
        + [
            "--worker",
            system,
            "--checkpoint",
            str(checkpoint),
            "--budget",
            args.budget,
            "--new-tokens",
            str(args.new_tokens),
            "--runs",
            str(args.runs),
            "--prompt",
            str(args.prompt),
            "--workdir",
            args.workdir,
            "--non-expert-bytes",
            str(non_expert),
        ]
        + (["--no-prefetch"] if args.no_prefetch else [])
    )
    env = dict(os.environ)
    # stock dequantized loading is the resident baseline: it needs RAM for every dequantized expert
    capped = args.cgroup_limit and system != "dequantize"
    group = _make_cgroup(f"moe_bench_{system}", args.cgroup_limit) if capped else None
    if group:
        env["MOE_BENCH_CGROUP"] = group
        # the shell joins the group, then becomes the worker: every byte it maps or caches is charged
        cmd = ["sh", "-c", f'echo $$ > {CGROUP_ROOT / group}/cgroup.procs && exec "$@"', "sh", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if group:
        try:
            (CGROUP_ROOT / group).rmdir()
        except OSError:
            pass
    if args.profile:
        print(f"--- profile of {system} ---\n{proc.stderr[-12000:]}", file=sys.stderr)
    if proc.returncode != 0:
        return {"system": system, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _format_report(by: dict, budget: int, non_expert: int, ram_budget: int, format_bytes) -> None:
    """The quantized-format table: experts per budget, bytes per decode token by tier, RSS against the budgets."""
    print(
        "\n| system | expert bytes (held) | experts per budget | decode tok/s | decode bytes/token device / host / "
        "disk | peak RSS - non-expert - budgets |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("moe-patch", "moe-patch-bf16", "dequantize"):
        r = by.get(name)
        if r is None or "error" in r:
            if r is not None:
                print(f"| {name} | error: {r['error']} | | | | |")
            continue
        st = r.get("stats")
        held = st["stored_expert_bytes"] if st else None
        if st and st.get("device_format") == "dequantized":
            held = st["expert_bytes"]
        per_tok = st["decode_bytes_per_token"] if st else {}
        tiers = " / ".join(format_bytes(per_tok[t]) for t in ("device", "host", "disk")) if per_tok else "-"
        over = format_bytes(r["peak_rss"] - non_expert - ram_budget) if st else "(all experts resident)"
        print(
            f"| {name} | {format_bytes(held) if held else '-'} | {budget // held if held else '-'} | "
            f"{r['decode_tok_s']:.3f} | {tiers} | {over} |"
        )
    q, b = by.get("moe-patch", {}).get("stats"), by.get("moe-patch-bf16", {}).get("stats")
    if q and b:
        print(
            f"\nthe host tier holds {b['stored_expert_bytes'] / q['stored_expert_bytes']:.2f}x the experts of the bf16 "
            f"checkpoint per byte (stored {format_bytes(q['stored_expert_bytes'])} vs "
            f"{format_bytes(b['stored_expert_bytes'])} "
            f"per expert); decode {by['moe-patch']['decode_tok_s'] / by['moe-patch-bf16']['decode_tok_s']:.2f}x "
            f"the bf16 "
            f"checkpoint's at the same budget; device cache keeps experts {q['device_format']}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--format",
        default="bf16",
        choices=list(FORMAT_SHAPES),
        help="checkpoint format: bf16, fp8 (Qwen3-30B-A3B-FP8 layout) or mxfp4 (gpt-oss-20b shapes); "
        "quantized formats also run moe-patch on the bf16 checkpoint of the same shapes and stock "
        "transformers' dequantize=True load",
    )
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype of both systems (default: float32 on CPU, where it is fastest; bfloat16 on CUDA)",
    )
    p.add_argument(
        "--host-cache",
        default="0",
        help="host RAM tier of moe-patch (pinned on CUDA); on CUDA also accelerate's max_memory['cpu']",
    )
    p.add_argument("--cpu-compute", default="auto", choices=["auto", "always", "never"])
    p.add_argument(
        "--cgroup-limit",
        default="auto",
        help="memory cap (RAM + page cache) for each system: 'auto' = "
        "non-expert + budget + one layer of experts + 1 GiB, 'none', or a size",
    )
    p.add_argument(
        "--budget",
        default="1GiB",
        help="expert memory budget (moe-patch expert_cache; accelerate gets "
        "non-expert bytes + this as max_memory['cpu'])",
    )
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default="/tmp/moe_patch_bench")
    p.add_argument("--checkpoint", default=None)
    p.add_argument(
        "--systems",
        default=None,
        help="default: moe-patch,accelerate (bf16); moe-patch,moe-patch-bf16,dequantize (quantized formats)",
    )
    p.add_argument("--bf16-checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--profile", action="store_true", help="cProfile the last run of each system (to stderr)")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--non-expert-bytes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.shape = args.shape or FORMAT_SHAPES[args.format]
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from moe_patch.offload.budget import format_bytes, parse_bytes

    quantized = args.format != "bf16"
    args.systems = args.systems or ("moe-patch,moe-patch-bf16,dequantize" if quantized else "moe-patch,accelerate")
    shp = SHAPES[args.shape]
    default_name = "qwen3-30b-a3b-shaped" if args.shape == "qwen3" else "gpt-oss-20b-shaped"
    t0 = time.perf_counter()
    if quantized:
        args.bf16_checkpoint = build_checkpoint(
            Path(args.workdir) / f"{default_name}-{args.layers}L", args.layers, args.shape
        )
        args.checkpoint = args.checkpoint or str(Path(args.workdir) / f"{default_name}-{args.layers}L-{args.format}")
        path = build_quantized(args.bf16_checkpoint, Path(args.checkpoint), args.format)
    else:
        args.checkpoint = args.checkpoint or str(Path(args.workdir) / f"{default_name}-{args.layers}L")
        path = args.bf16_checkpoint = build_checkpoint(Path(args.checkpoint), args.layers, args.shape)
    print(f"checkpoint {path} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    expert_bf16 = 3 * shp["hidden"] * shp["inter"] * 2
    expert_total = args.layers * shp["experts"] * expert_bf16
    files_total = sum(f.stat().st_size for f in Path(args.bf16_checkpoint).glob("*.safetensors"))
    non_expert = files_total - expert_total
    budget = parse_bytes(args.budget)
    scale = torch.empty((), dtype=getattr(torch, args.dtype)).element_size() / 2  # checkpoint is bf16
    layer_experts = int(expert_total / args.layers * scale)
    if args.cgroup_limit == "auto":
        # on CUDA the budget is GPU memory; host RAM holds the host cache instead
        ram_budget = parse_bytes(args.host_cache) if args.device == "cuda" else budget
        args.cgroup_limit = int(non_expert * scale) + ram_budget + layer_experts + 2**30
    elif args.cgroup_limit == "none":
        args.cgroup_limit = None
    else:
        args.cgroup_limit = parse_bytes(args.cgroup_limit)
    non_expert = int(non_expert * scale)
    results = [run_worker(s, args, non_expert) for s in args.systems.split(",")]
    by = {r["system"]: r for r in results}
    print(
        f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, torch {torch.__version__}"
    )
    print(
        f"model: {shp['name']} layer shapes, {args.layers} layers, checkpoint {args.format}, compute {args.dtype}; "
        f"experts "
        f"{format_bytes(expert_total * scale)} in {args.dtype} = {expert_total * scale / budget:.1f}x the "
        f"{format_bytes(budget)} budget; non-expert {format_bytes(non_expert)}; memory cap (RAM + page cache) "
        f"{format_bytes(args.cgroup_limit) if args.cgroup_limit else 'none'}"
    )
    gpu = next((r["gpu"] for r in results if "gpu" in r), None)
    if gpu:
        print(f"GPU: {gpu}; expert cache {format_bytes(budget)} of GPU memory, host cache {args.host_cache}")
    ram_budget = parse_bytes(args.host_cache) if args.device == "cuda" else budget
    print(
        f"| system | decode tok/s (median) | runs | prefill s | peak RSS | RSS - non-expert - "
        f"{'host cache' if gpu else 'budget'} "
        "| cgroup peak | GPU peak |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['system']} | error: {r['error']} | | | | | | |")
            continue
        print(
            f"| {r['system']} | {r['decode_tok_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['decode_tok_s_runs'])} | "
            f"{r['prefill_s']:.2f} | {format_bytes(r['peak_rss'])} | "
            f"{format_bytes(r['peak_rss'] - non_expert - ram_budget)} | "
            f"{format_bytes(r['cgroup_peak']) if r.get('cgroup_peak') else '-'} | "
            f"{format_bytes(r['gpu_peak']) if r.get('gpu_peak') else '-'} |"
        )
    mp = by.get("moe-patch", {})
    if mp.get("design_bound_s"):
        step = 1 / mp["decode_tok_s"]
        bw = mp["bandwidths"]
        print(
            f"\nDESIGN section 5 bound (1-h)B/(BW_pcie+BW_dram): h={mp['stats']['hit_rate']:.2f}, "
            f"PCIe {bw['h2d'] / 1e9:.1f} GB/s, DRAM {bw['dram'] / 1e9:.1f} GB/s -> "
            f"{1e3 * mp['design_bound_s']:.1f} ms; "
            f"achieved {1e3 * step:.1f} ms/token = {mp['design_bound_s'] / step:.0%} of the bound"
        )
    if "moe-patch" in by and "accelerate" in by and "error" not in by["moe-patch"] and "error" not in by["accelerate"]:
        print(
            f"\nspeed-up moe-patch / accelerate: "
            f"{by['moe-patch']['decode_tok_s'] / by['accelerate']['decode_tok_s']:.1f}x; "
            f"same tokens: {by['moe-patch']['tokens'] == by['accelerate']['tokens']}"
        )
    if quantized:
        _format_report(by, budget, non_expert, ram_budget, format_bytes)
    if "moe-patch" in by and "stats_text" in by["moe-patch"]:
        print("\n" + by["moe-patch"]["stats_text"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
