"""End-to-end decode and prefill: stock transformers, ``patch_model``, the offload engine (every expert cached,
and experts from disk under a memory cap) and, when given a build, llama.cpp on the same weights.

    python bench/decode.py --layers 4 --rounds 3                                   # transformers systems only
    python bench/decode.py --llama-cpp /path/to/llama.cpp --cap 2.77GiB --budget 1GiB   # + llama.cpp, capped runs
    python bench/decode.py --profile                          # where a decode step's milliseconds go, per part
    python bench/decode.py --format mxfp4 --llama-cpp /path/to/llama.cpp   # gpt-oss-20b shapes, MXFP4 experts
    python bench/decode.py --format fp8 --llama-cpp /path/to/llama.cpp     # Qwen3-30B-A3B-FP8 layout vs Q8_0
    python bench/decode.py --format mxfp4 --depth 2048 --systems engine-cached,engine-stock-attention  # long context

The checkpoint is random bf16 weights with Qwen3-30B-A3B layer shapes (``moe_patch.testing.synthetic``), converted
once to GGUF (bf16 and Q8_0) with llama.cpp's own ``convert_hf_to_gguf.py`` (its built-in ``llama-spm`` vocabulary
stands in for the tokenizer a random model does not have) and ``llama-quantize`` when it is built. ``--format
mxfp4`` takes gpt-oss-20b's layer shapes (hidden 2880, 32 experts, top-4, expert width 2880, biases, clamped
SwiGLU) with random MXFP4 blocks and scales (``moe_patch.testing.synthetic.build_quantized``); llama.cpp's
converter writes its MXFP4 GGUF from that checkpoint directly (experts repacked bit for bit, the rest bf16).
``--format fp8``: Qwen3-30B-A3B-FP8's layout (128x128 block scales), against llama.cpp's Q8_0 of the same FP8
checkpoint (its converter dequantizes FP8). Stock transformers and ``patch_model`` load quantized checkpoints
with ``dequantize=True`` (bf16 copies of every expert); the engine keeps them in their stored bytes.

Every system sees the same tokens: llama-bench feeds ``rand() % n_vocab`` from glibc's generator seeded 1
(a BOS first), so the Python systems are teacher-forced with exactly that sequence (:func:`glibc_rand`), one
token per step for decode (``-n``) and one batch for prefill (``-p``). Routing, and so speed, depends on the
tokens. Each (system, round) runs in a fresh process; rounds interleave the systems; figures are medians;
the load average is recorded before and after. Memory caps are cgroup-v1 limits on RAM *and page cache*
(root only), so "from disk" means it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402

VOCAB = 32000
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def glibc_rand(n: int, seed: int = 1) -> list[int]:
    """The first ``n`` values of glibc's ``rand()`` after ``srand(seed)`` (its TYPE_3 additive generator),
    which llama-bench uses (unseeded: seed 1) to make its tokens."""
    r = [0] * (344 + n)
    r[0] = seed
    for i in range(1, 31):
        r[i] = (16807 * r[i - 1]) % 2147483647
    for i in range(31, 34):
        r[i] = r[i - 31]
    for i in range(34, 344 + n):
        r[i] = (r[i - 31] + r[i - 3]) & 0xFFFFFFFF
    return [r[i] >> 1 for i in range(344, 344 + n)]


def llama_bench_tokens(n: int, bos: int | None, vocab: int = VOCAB) -> list[int]:
    """The ``n`` tokens llama-bench's pp / tg test feeds in a fresh process: BOS (when the vocabulary adds
    one) then ``rand() % vocab``."""
    values = glibc_rand(n)
    tokens = [v % vocab for v in values]
    if bos is not None:
        tokens = [bos] + tokens[: n - 1]
    return tokens[:n]


def llama_bench_depth_tokens(depth: int, n: int, bos: int | None, vocab: int = VOCAB) -> tuple[list[int], list[int]]:
    """The ``depth`` tokens llama-bench's ``-d`` puts in the cache first, then the ``n`` its tg test decodes (one
    rand() sequence in a fresh process: BOS then rand() for the depth prompt, BOS again then rand() for tg)."""
    extra = 1 if bos is not None else 0
    values = [v % vocab for v in glibc_rand(depth + n)]
    prefix = ([bos] if bos is not None else []) + values[: depth - extra]
    rest = values[depth - extra :]
    decode = ([bos] if bos is not None else []) + rest[: n - extra]
    return prefix[:depth], decode[:n]


# --------------------------------------------------------------------------- the Python systems
def _load(system: str, path: Path, dtype: torch.dtype, budget: int | None, fmt: str = "bf16", direct_io: str = "auto"):
    from transformers import AutoModelForCausalLM

    import moe_patch

    if system in ("stock", "patched"):
        kwargs = {}
        if fmt != "bf16":  # stock transformers computes quantized experts from dequantized copies on a CPU
            from transformers import FineGrainedFP8Config, Mxfp4Config

            kwargs["quantization_config"] = (Mxfp4Config if fmt == "mxfp4" else FineGrainedFP8Config)(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
        if system == "patched":
            moe_patch.patch_model(model)
        return model
    from moe_patch.offload import OffloadOptions

    if system == "engine-stock-attention":  # the A/B of moe_patch.cpu_attention: transformers' attention kept
        import moe_patch.cpu_attention

        moe_patch.cpu_attention.install_cpu_attention = lambda model: False
    options = OffloadOptions(
        expert_cache=budget if system == "engine-capped" else None, host_cache=0, direct_io=direct_io
    )
    return moe_patch.load_model(path, dtype=dtype, options=options)


def _decode_steps(model, tokens: list[int], prefix: list[int] | None = None) -> list[float]:
    """Feed ``tokens`` one per step with a KV cache (teacher-forced); seconds of each step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    times = []
    with torch.no_grad():
        if prefix:  # the cached context the steps decode after (untimed)
            model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
        for t in tokens:
            ids = torch.tensor([[t]])
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
    return times


def profile_step(model, tokens: list[int]) -> dict[str, dict[str, float]]:
    """Where the milliseconds of a decode step go: wall time per part of the model (forward hooks; the CPU
    computes synchronously), the weight bytes each part reads per step and the rate that makes."""
    from moe_patch.families import find_moe_blocks

    text = model.model
    blocks = find_moe_blocks(model)
    experts = {id(h.experts): h for h in blocks}
    routers = {id(h.router) for h in blocks}
    parts: dict[str, list[torch.nn.Module]] = {
        "attention": [],
        "MoE block": [],
        "of which router": [],
        "of which routed experts": [],
        "norms": [],
        "embedding": [text.embed_tokens],
        "lm_head": [model.lm_head],
    }
    for layer in text.layers:
        parts["attention"].append(layer.self_attn)
        parts["norms"] += [layer.input_layernorm, layer.post_attention_layernorm]
        parts["MoE block"].append(layer.mlp)
        for child in layer.mlp.children():  # the offload engine runs its experts inside the block: not seen
            if id(child) in experts:
                parts["of which routed experts"].append(child)
            elif id(child) in routers:
                parts["of which router"].append(child)
    parts["norms"].append(text.norm)
    spent = {k: 0.0 for k in parts}
    hooks, started = [], {}
    for kind, modules in parts.items():
        for m in modules:
            hooks.append(
                m.register_forward_pre_hook(lambda mod, a, kind=kind: started.__setitem__(id(mod), time.perf_counter()))
            )
            hooks.append(
                m.register_forward_hook(
                    lambda mod, a, o, kind=kind: spent.__setitem__(
                        kind, spent[kind] + time.perf_counter() - started[id(mod)]
                    )
                )
            )
    try:
        total = sum(_decode_steps(model, tokens))
    finally:
        for h in hooks:
            h.remove()
    k = model.config.num_experts_per_tok
    out = {}
    for kind, modules in parts.items():
        nbytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        if kind in ("MoE block", "of which routed experts"):  # top-k experts per token (offloaded: no parameters)
            nbytes = sum(k * h.info.params_per_expert for h in blocks) * text.embed_tokens.weight.element_size()
            if kind == "MoE block":
                nbytes += sum(
                    p.numel() * p.element_size() for h in blocks if h.router is not None for p in h.router.parameters()
                )
        if kind == "embedding":
            nbytes = model.config.hidden_size * text.embed_tokens.weight.element_size()  # one row
        ms = 1000 * spent[kind] / len(tokens)
        out[kind] = {"ms": ms, "mb": nbytes / 1e6, "gb_s": nbytes / 1e9 / (ms / 1000) if ms else 0.0}
    rest = 1000 * total / len(tokens) - sum(v["ms"] for k, v in out.items() if not k.startswith("of which"))
    out["rest (Python, cache, sampling-free glue)"] = {"ms": rest, "mb": 0.0, "gb_s": 0.0}
    return out


def _prefill_s(model, tokens: list[int]) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=torch.tensor([tokens]), use_cache=False)
        return time.perf_counter() - t0


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    path = Path(args.checkpoint)
    from moe_patch.testing.synthetic import drop_page_cache

    if args.system == "engine-capped":
        drop_page_cache(path)
    t0 = time.perf_counter()
    model = _load(args.system, path, dtype, args.budget_bytes, args.format, args.direct_io)
    load_s = time.perf_counter() - t0
    decode_tokens = llama_bench_tokens(args.tokens, args.bos)
    prefix, depth_tokens = llama_bench_depth_tokens(args.depth, args.tokens, args.bos) if args.depth else (None, None)
    prefill_tokens = llama_bench_tokens(args.prompt, args.bos)
    from moe_patch.offload import get_offload_handle

    handle = get_offload_handle(model)
    if args.system != "engine-capped":  # in RAM: every system warm (weights paged in, experts cached)
        _decode_steps(model, decode_tokens)
        _prefill_s(model, prefill_tokens)
        if handle is not None:
            handle.reset_stats()
    if args.profile:
        return {"system": args.system, "profile": profile_step(model, decode_tokens)}
    io0 = _proc_io()
    steps = _decode_steps(model, depth_tokens, prefix) if args.depth else _decode_steps(model, decode_tokens)
    io1 = _proc_io()
    prefill = _prefill_s(model, prefill_tokens)
    out = {
        "system": args.system,
        "load_s": load_s,
        "decode_tok_s": len(steps) / sum(steps),
        "prefill_tok_s": len(prefill_tokens) / prefill,
        "peak_rss": _peak_rss(),
        "disk_read_bytes_per_token": (io1 - io0) / len(steps) if io0 is not None else None,
    }
    if handle is not None:
        st = handle.stats.to_dict()
        out["stats"] = {
            k: st[k]
            for k in (
                "hit_rate",
                "decode_bytes_per_token",
                "fraction_of_bound",
                "decode_bound_s",
                "stored_format",
                "device_format",
            )
        }
        out["stats_text"] = str(handle.stats)
        kernels = getattr(handle.engine, "kernels", None)
        out["kernel_calls"] = kernels.calls if kernels is not None else None
        cmap = getattr(handle.engine.source, "cmap", None)
        out["direct_reads"] = bool(cmap is not None and cmap.checkpoint.direct)  # past the page cache
    return out


def _proc_io() -> int | None:
    """Bytes this process made the kernel read from storage (``/proc/self/io`` read_bytes)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(re.search(r"^read_bytes: (\d+)", text, re.M).group(1))


def _peak_rss() -> int:
    from moe_patch.testing.synthetic import peak_rss_bytes

    return peak_rss_bytes()


# --------------------------------------------------------------------------- llama.cpp
def llama_cpp_tools(root: Path) -> dict[str, Path]:
    found = {}
    for name in ("llama-bench", "llama-quantize"):
        for cand in (root / "build" / "bin" / name, root / "bin" / name, root / name):
            if cand.is_file():
                found[name] = cand
                break
    convert = next(
        (p for p in (root / "convert_hf_to_gguf.py", root.parent / "convert_hf_to_gguf.py") if p.is_file()), None
    )
    if "llama-bench" not in found or convert is None:
        raise SystemExit(f"{root}: no llama-bench binary or convert_hf_to_gguf.py found")
    found["convert"] = convert
    return found


def _convert(tools: dict[str, Path], checkpoint: Path, out: Path, target: Path, outtype: str) -> Path:
    """``checkpoint`` to ``target`` with llama.cpp's converter (the built-in llama-spm vocabulary as the
    tokenizer a random model lacks); written under another name and renamed (a killed run leaves no GGUF)."""
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    shim = out / "convert_random.py"
    arch = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    shim.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(tools['convert'].parent / 'gguf-py')!r})\n"
        # the converter finds its built-in vocabularies under sys.path[0]/models
        f"sys.path.insert(0, {str(tools['convert'].parent)!r})\n"
        "import convert_hf_to_gguf as c\n"
        "from conversion import get_model_class\n"
        "# a random-weight model has no tokenizer: llama.cpp's built-in 32000-token SentencePiece vocabulary\n"
        f"get_model_class({arch!r}).set_vocab = lambda self: self._set_vocab_builtin('llama-spm', 32000)\n"
        "sys.argv = ['convert_hf_to_gguf.py'] + sys.argv[1:]\n"
        "c.main()\n"
    )
    partial = target.with_suffix(".partial")
    subprocess.run(
        [sys.executable, str(shim), str(checkpoint), "--outtype", outtype, "--outfile", str(partial)],
        check=True,
        capture_output=True,
        text=True,
    )
    partial.rename(target)
    return target


def to_gguf(tools: dict[str, Path], checkpoint: Path, out: Path, quant: str) -> Path:
    """A GGUF of the checkpoint for llama.cpp system ``quant``: ``bf16``; ``q8_0`` (llama-quantize on the bf16
    GGUF when it is built, else the converter's own q8_0; from an FP8 checkpoint the converter dequantizes);
    ``mxfp4`` (from the MXFP4 checkpoint: experts repacked as they are stored, the other weights bf16)."""
    target = out / f"model-{quant}.gguf"
    if target.exists():
        return target
    if quant in ("bf16", "mxfp4"):
        return _convert(tools, checkpoint, out, target, "bf16")
    if "llama-quantize" in tools and not (checkpoint / "config.json").read_text().count("quantization_config"):
        bf16 = to_gguf(tools, checkpoint, out, "bf16")
        partial = target.with_suffix(".partial")
        subprocess.run(
            [str(tools["llama-quantize"]), str(bf16), str(partial), quant.upper()],
            check=True,
            capture_output=True,
            text=True,
        )
        partial.rename(target)
        return target
    return _convert(tools, checkpoint, out, target, quant)


def gguf_bos(path: Path, tools: dict[str, Path]) -> int | None:
    """The BOS id llama-bench feeds first, when the GGUF's vocabulary adds one."""
    sys.path.insert(0, str(tools["convert"].parent / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    return field("tokenizer.ggml.bos_token_id") if field("tokenizer.ggml.add_bos_token") else None


def run_llama_bench(tools: dict[str, Path], gguf: Path, args, group: str | None) -> dict:
    """pp and tg in separate processes, so each starts llama-bench's rand() sequence afresh (the tokens the
    Python systems are fed)."""
    out = {}
    for test, flag in (
        ("prefill", ["-p", str(args.prompt), "-n", "0"]),
        ("decode", ["-p", "0", "-n", str(args.tokens)] + (["-d", str(args.depth)] if args.depth else [])),
    ):
        cmd = [
            str(tools["llama-bench"]),
            "-m",
            str(gguf),
            "-t",
            str(args.threads),
            "-r",
            "1",
            "--no-warmup",
            "-o",
            "json",
            *flag,
        ]
        if group:
            cmd = ["sh", "-c", f'echo $$ > {CGROUP_ROOT / group}/cgroup.procs && exec "$@"', "sh", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        result = json.loads(proc.stdout)[0]
        out[f"{test}_tok_s"] = result["avg_ts"]
    return out


# --------------------------------------------------------------------------- driver
def _cgroup(name: str, limit: int | None) -> str | None:
    if not limit:
        return None
    d = CGROUP_ROOT / name
    try:
        d.mkdir(exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(str(limit))
        (d / "memory.max_usage_in_bytes").write_text("0")
        return name
    except OSError:
        return None


def run_python(system: str, args, checkpoint: Path, group: str | None) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--checkpoint",
        str(checkpoint),
        "--dtype",
        args.dtype,
        "--format",
        args.format,
        "--tokens",
        str(args.tokens),
        "--prompt",
        str(args.prompt),
        "--depth",
        str(args.depth),
        "--threads",
        str(args.threads),
        "--budget",
        args.budget,
        "--direct-io",
        args.direct_io,
        "--bos",
        str(args.bos if args.bos is not None else -1),
    ] + (["--profile"] if args.profile else [])
    if group:
        cmd = ["sh", "-c", f'echo $$ > {CGROUP_ROOT / group}/cgroup.procs && exec "$@"', "sh", *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(_HERE).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        return {"system": system, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_profiles(args, checkpoint: Path) -> int:
    """One warm decode of each in-RAM system, timed per part of the model (``--profile``)."""
    rows = {}
    for system in args.systems.split(","):
        res = run_python(system, args, checkpoint, None)
        if "error" in res:
            print(f"{system}: {res['error']}", file=sys.stderr)
            continue
        rows[system] = res["profile"]
    print(
        f"\n{args.layers} layers, {args.dtype}, {args.tokens} decode steps after a warm-up, {args.threads} threads; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("| part | " + " | ".join(f"{s} ms/step (GB/s)" for s in rows) + " | weight MB read per step |")
    print("|---|" + "---|" * (len(rows) + 1))
    first = next(iter(rows.values()), {})
    for part in first:
        cells = [
            f"{r[part]['ms']:.2f}" + (f" ({r[part]['gb_s']:.1f})" if r[part]["gb_s"] else "") for r in rows.values()
        ]
        print(f"| {part} | " + " | ".join(cells) + f" | {first[part]['mb']:.1f} |")

    def top(r):
        return [v for k, v in r.items() if not k.startswith("of which")]

    totals = [sum(v["ms"] for v in top(r)) for r in rows.values()]
    print("| total | " + " | ".join(f"{t:.2f}" for t in totals) + f" | {sum(v['mb'] for v in top(first)):.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"profiles": rows, "systems": list(rows)}, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument(
        "--format",
        default="bf16",
        choices=["bf16", "fp8", "mxfp4"],
        help="checkpoint format: bf16 and fp8 with Qwen3-30B-A3B shapes, mxfp4 with gpt-oss-20b's",
    )
    p.add_argument(
        "--shape",
        default=None,
        help="layer shapes (moe_patch.testing.synthetic.SHAPES; default: the format's, e.g. qwen3 for bf16); "
        "qwen3-small (hidden 512, 32 experts, top-4) weighs the per-layer fixed costs",
    )
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of the Python systems")
    p.add_argument("--tokens", type=int, default=32, help="decode steps (llama-bench -n)")
    p.add_argument("--prompt", type=int, default=16, help="prefill length (llama-bench -p)")
    p.add_argument("--depth", type=int, default=0, help="tokens in the cache when decode starts (llama-bench -d)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", default="1GiB", help="expert_cache of the capped engine run")
    p.add_argument(
        "--direct-io",
        default="auto",
        choices=("auto", "always", "never"),
        help="OffloadOptions.direct_io of the engine runs (reads past the page cache)",
    )
    p.add_argument(
        "--cap", default=None, help="RAM + page cache cap of the capped runs (e.g. 2.77GiB); none: skip them"
    )
    p.add_argument("--llama-cpp", default=None, help="a llama.cpp source tree with llama-bench built")
    p.add_argument("--systems", default="stock,patched,engine-cached")
    p.add_argument("--workdir", default="/tmp/moe_patch_bench")
    p.add_argument("--json", default=None)
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bos", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of the comparison: where a decode step's milliseconds go, per part of each system",
    )
    args = p.parse_args(argv)
    from moe_patch.sizes import parse_size

    args.budget_bytes = parse_size(args.budget)
    if args.worker:
        args.bos = None if args.bos is not None and args.bos < 0 else args.bos
        args.system = args.worker
        print(json.dumps(worker(args)))
        return 0
    from moe_patch.sizes import format_bytes
    from moe_patch.testing.synthetic import FORMAT_SHAPES, SHAPES, build_checkpoint, build_quantized

    shape = args.shape or FORMAT_SHAPES[args.format]
    if shape not in SHAPES:
        p.error(f"--shape: one of {', '.join(SHAPES)}")
    name = SHAPES[shape]["name"].lower()
    if shape == "gpt-oss-120b":  # no bf16 twin: MXFP4 written directly (the twin alone would exceed most disks)
        if args.format != "mxfp4":
            p.error("--shape gpt-oss-120b is written as MXFP4 only (--format mxfp4)")
        where = Path(args.workdir) / f"{name}-shaped-{args.layers}L-mxfp4"
        checkpoint = build_checkpoint(where, args.layers, shape, experts="mxfp4")
    else:
        checkpoint = build_checkpoint(Path(args.workdir) / f"{name}-shaped-{args.layers}L", args.layers, shape)
    if args.format != "bf16" and shape != "gpt-oss-120b":
        checkpoint = build_quantized(
            checkpoint, Path(args.workdir) / f"{name}-shaped-{args.layers}L-{args.format}", args.format
        )
    if args.profile:
        return print_profiles(args, checkpoint)
    cap = parse_size(args.cap) if args.cap else None
    systems = [s for s in args.systems.split(",") if s] + (["engine-capped"] if cap else [])
    tools, ggufs = None, {}
    args.bos = None
    if args.llama_cpp:
        tools = llama_cpp_tools(Path(args.llama_cpp))
        quants = {"bf16": ("bf16", "q8_0"), "fp8": ("q8_0",), "mxfp4": ("mxfp4",)}[args.format]
        for quant in quants:
            ggufs[quant] = to_gguf(tools, checkpoint, Path(args.workdir) / f"gguf-{checkpoint.name}", quant)
        args.bos = gguf_bos(ggufs[quants[0]], tools)
        systems += [f"llama.cpp-{q}" for q in quants] + ([f"llama.cpp-{quants[0]}-capped"] if cap else [])
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(args.rounds):
        order = systems[r % len(systems) :] + systems[: r % len(systems)]  # interleaved, rotated per round
        for system in order:
            capped = system.endswith("capped")
            group = _cgroup(f"moe_decode_{r}_{system}", cap) if capped else None
            if capped and group is None:
                results[system].append({"error": "memory cap needs a cgroup-v1 memory controller (root)"})
                continue
            if system.startswith("llama.cpp"):
                quant = system.removeprefix("llama.cpp-").removesuffix("-capped")
                if capped:
                    from moe_patch.testing.synthetic import drop_page_cache

                    drop_page_cache(ggufs[quant].parent, "*.gguf")
                res = run_llama_bench(tools, ggufs[quant], args, group)
            else:
                res = run_python(system, args, checkpoint, group)
            if group:
                peak = CGROUP_ROOT / group / "memory.max_usage_in_bytes"
                res["cgroup_peak"] = int(peak.read_text()) if peak.exists() else None
                try:
                    (CGROUP_ROOT / group).rmdir()
                except OSError:
                    pass
            results[system].append(res)
            print(
                f"round {r} {system}: {json.dumps({k: v for k, v in res.items() if k != 'stats_text'})}",
                file=sys.stderr,
            )
    load_after = os.getloadavg()
    print(
        f"\nmachine: {platform.platform()}, {os.cpu_count()} cores, {platform.processor() or _cpu_name()}, "
        f"torch {torch.__version__}, {args.threads} threads; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    print(
        f"model: {SHAPES[shape]['name']} layer shapes, {args.layers} layers, {args.format} checkpoint, "
        f"compute {args.dtype}; "
        f"{args.tokens} decode steps"
        + (f" after {args.depth} cached tokens" if args.depth else "")
        + f" and a {args.prompt}-token prefill on llama-bench's token sequence; "
        f"medians of {args.rounds} interleaved rounds"
        + (f"; capped runs: RAM + page cache {args.cap}, expert_cache {args.budget}" if cap else "")
    )
    print("\n| system | decode tok/s | prefill tok/s | decode vs stock | disk read per token (kernel) | notes |")
    print("|---|---|---|---|---|---|")
    med = {}
    for system, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            print(f"| {system} | error: {runs[0].get('error') if runs else 'not run'} | | | | |")
            continue
        med[system] = {k: statistics.median(r[k] for r in ok) for k in ("decode_tok_s", "prefill_tok_s")}
        io = [r.get("disk_read_bytes_per_token") for r in ok if r.get("disk_read_bytes_per_token") is not None]
        note = ""
        if ok[-1].get("stats"):
            st = ok[-1]["stats"]
            note = (
                f"hit rate {st['hit_rate']:.0%}, {st['fraction_of_bound']:.0%} of its bound"
                if st["hit_rate"] == st["hit_rate"] and st["fraction_of_bound"] == st["fraction_of_bound"]
                else ""
            )
        if ok[-1].get("cgroup_peak"):
            note += f" cgroup peak {format_bytes(ok[-1]['cgroup_peak'])}"
        ratio = med[system]["decode_tok_s"] / med["stock"]["decode_tok_s"] if "stock" in med else float("nan")
        print(
            f"| {system} | {med[system]['decode_tok_s']:.2f} | {med[system]['prefill_tok_s']:.1f} | {ratio:.2f}x | "
            f"{format_bytes(statistics.median(io)) if io else '-'} | {note.strip()} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"results": results, "medians": med, "load": [load_before, load_after]}, indent=2)
        )
    return 0


def _cpu_name() -> str:
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
