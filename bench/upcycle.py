"""Upcycling benchmark: `moe-patch upcycle` against mergekit's `mergekit-moe`, same conversion, same run.

Builds a synthetic dense Llama checkpoint (random bf16 weights, a local word-level tokenizer; no
download), then converts it into a Mixtral with N plain copies (G = 1, random router, which both tools
support and which is exact at init) with each tool, alternating, several times, each run starting
with the source in the page cache and no dirty pages left from the previous run (``os.sync``). Reports per tool: median
wall time, peak RSS of the converting process (``wait4`` rusage), output size, and whether the output
matches the dense model (fp32 logits and greedy tokens, loaded with plain transformers). Also checks
that ``--dry-run``'s predicted peak RSS is within 10% of the measured one.

    python bench/upcycle.py --mergekit-bin /tmp/mk-venv/bin/mergekit-moe
    python bench/upcycle.py --layers 4 --runs 1            # quick smoke run
    python bench/upcycle.py --experts 16 --runs 1 --mergekit-bin "" --no-check   # RSS vs number of experts

mergekit lives in its own virtual environment (it pins its own dependencies); pass its console script
with --mergekit-bin. Without it the mergekit column is reported as not run, with the reason.
"""

from __future__ import annotations

import os
import sys

# bench/ holds scripts named like stdlib modules (inspect.py): keep this folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse
import json
import platform
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build_source(path: Path, *, hidden: int, ffn: int, layers: int, vocab: int, shard_bytes: int = 500 * 10**6) -> None:
    """Write a dense Llama checkpoint shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    if (path / "config.json").is_file():
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    heads = max(hidden // 64, 1)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    cfg.save_pretrained(tmp)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(tmp)
    gen = torch.Generator().manual_seed(0)
    kv = cfg.num_key_value_heads * (hidden // heads)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    tensors: list[tuple[str, torch.Tensor]] = [("model.embed_tokens.weight", rand(vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16)),
            (p + "post_attention_layernorm.weight", torch.ones(hidden, dtype=torch.bfloat16)),
            (p + "self_attn.q_proj.weight", rand(hidden, hidden)),
            (p + "self_attn.k_proj.weight", rand(kv, hidden)),
            (p + "self_attn.v_proj.weight", rand(kv, hidden)),
            (p + "self_attn.o_proj.weight", rand(hidden, hidden)),
            (p + "mlp.gate_proj.weight", rand(ffn, hidden)),
            (p + "mlp.up_proj.weight", rand(ffn, hidden)),
            (p + "mlp.down_proj.weight", rand(hidden, ffn)),
        ]
    tensors += [
        ("model.norm.weight", torch.ones(hidden, dtype=torch.bfloat16)),
        ("lm_head.weight", rand(vocab, hidden)),
    ]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        if shards[-1] and size + t.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 2
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, tmp / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * 2 for _, t in tensors)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    del tensors, shards
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab_map.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        tmp
    )
    tmp.rename(path)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_measured(cmd: list[str], log: Path) -> tuple[float, float, int, int]:
    """Run ``cmd``; return (wall s, CPU s (user + system), peak RSS bytes, exit code) of that process.

    CPU time is reported beside wall time because the benchmark machine is shared: other jobs
    stretch wall time, much less the CPU time each tool needs.
    """
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def drop_to_page_cache(path: Path) -> None:
    """Read the source once so every run starts with it in the page cache (same conditions for both tools)."""
    for p in path.rglob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def check_equivalence(src: Path, out: Path) -> dict:
    """Compare an output with the dense source in a fresh process (both models in fp32)."""
    code = (
        "import json,sys,torch; torch.set_num_threads(2); from converters import verify_folders; "
        "v=verify_folders(sys.argv[1], sys.argv[2]); print('RESULT'+json.dumps(v.to_dict()))"
    )
    res = subprocess.run([sys.executable, "-c", code, str(src), str(out)], capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"RESULT(\{.*\})", res.stdout)
    if not m:
        return {"error": (res.stderr or res.stdout).strip().splitlines()[-1:]}
    return json.loads(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moe-patch-upcycle-bench"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mergekit-bin", default=shutil.which("mergekit-moe"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--no-check", action="store_true", help="skip the equivalence check (it loads both models in fp32)")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"dense-h{args.hidden}-f{args.ffn}-l{args.layers}-v{args.vocab}"
    build_source(src, hidden=args.hidden, ffn=args.ffn, layers=args.layers, vocab=args.vocab)
    src_bytes = folder_bytes(src)
    drop_to_page_cache(src)

    ours_out, mk_out = work / "out-moe-patch", work / "out-mergekit"
    ours_cmd = [
        sys.executable,
        "-m",
        "moe_patch.cli",
        "upcycle",
        str(src),
        str(ours_out),
        "--num-experts",
        str(args.experts),
        "--top-k",
        str(args.top_k),
        "--router-init",
        "random",
        "--no-verify",
        "--overwrite",
    ]
    mk_cfg = work / "mergekit-moe.yml"
    mk_cfg.write_text(
        f"base_model: {src}\ngate_mode: random\ndtype: bfloat16\nexperts:\n"
        + "".join(f"  - source_model: {src}\n" for _ in range(args.experts))
    )
    mk_cmd = (
        [args.mergekit_bin, str(mk_cfg), str(mk_out), "--i-understand-this-is-not-useful-without-training"]
        if args.mergekit_bin
        else None
    )
    mk_reason = None if mk_cmd else "mergekit-moe not found (pass --mergekit-bin)"

    # dry run: predicted peak RSS
    dry = subprocess.run([*ours_cmd[:-2], "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"predicted peak RSS: conversion ([\d.]+) (GiB|MiB)", dry.stdout)
    predicted = float(m.group(1)) * (2**30 if m.group(2) == "GiB" else 2**20) if m else None

    results: dict[str, dict] = {k: {"wall": [], "cpu": [], "rss": []} for k in ("moe-patch", "mergekit")}
    for r in range(args.runs):
        order = [("moe-patch", ours_cmd, ours_out), ("mergekit", mk_cmd, mk_out)]
        if r % 2:
            order.reverse()
        for name, cmd, out in order:
            if cmd is None:
                continue
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # flush the previous run's output so its write-back does not slow this one
            wall, cpu, rss, rc = run_measured(cmd, work / f"{name}-{r}.log")
            if rc != 0:
                tail = (work / f"{name}-{r}.log").read_text(errors="replace").strip().splitlines()[-3:]
                if name == "mergekit":
                    mk_reason, mk_cmd = f"mergekit-moe failed (exit {rc}): {' | '.join(tail)}", None
                    continue
                raise SystemExit(f"moe-patch failed (exit {rc}): {tail}")
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
            results[name]["rss"].append(rss)
            print(f"run {r} {name:9s} {wall:7.2f} s wall {cpu:7.2f} s CPU  peak RSS {rss / 2**20:8.1f} MiB", flush=True)

    summary: dict[str, object] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1_5_15_min_at_end": os.getloadavg(),
        "command": " ".join([sys.executable, *sys.argv]),
        "source": {"path": str(src), "bytes": src_bytes, "layers": args.layers, "hidden": args.hidden, "ffn": args.ffn},
        "recipe": f"{args.experts} experts top-{args.top_k}, plain copies, random router, bf16",
        "predicted_peak_rss": predicted,
    }
    for name, out in (("moe-patch", ours_out), ("mergekit", mk_out)):
        res = results[name]
        if not res["wall"]:
            summary[name] = {"ran": False, "reason": mk_reason}
            continue
        summary[name] = {
            "ran": True,
            "wall_s_median": statistics.median(res["wall"]),
            "wall_s_all": res["wall"],
            "cpu_s_median": statistics.median(res["cpu"]),
            "cpu_s_all": res["cpu"],
            "peak_rss_median": statistics.median(res["rss"]),
            "output_bytes": folder_bytes(out),
            "check": None if args.no_check else check_equivalence(src, out),
        }
    ours = summary["moe-patch"]
    if predicted:
        summary["predicted_vs_measured_rss"] = predicted / ours["peak_rss_median"]
    mk = summary["mergekit"]
    if mk.get("ran"):
        summary["speedup_vs_mergekit"] = mk["wall_s_median"] / ours["wall_s_median"]
        summary["cpu_time_ratio_mergekit_over_ours"] = mk["cpu_s_median"] / ours["cpu_s_median"]
        summary["rss_ratio_vs_mergekit"] = ours["peak_rss_median"] / mk["peak_rss_median"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(ours_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
