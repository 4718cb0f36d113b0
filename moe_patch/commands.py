"""`moe-patch demo` and `moe-patch inspect`: argument parsing and printing only."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from .cli import int_at_least, new_folder, size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a small random MoE checkpoint, inspect, patch, generate (no download)")
    p.add_argument("--family", default="qwen3_moe", choices=("qwen3_moe", "mixtral", "deepseek_v3"),
                   help="MoE family of the random checkpoint (default qwen3_moe)")
    p.add_argument("--out", type=new_folder, help="where to write the demo checkpoint (default: a temporary folder)")
    p.add_argument("--tokens", type=int_at_least(1), default=32, help="tokens to generate (default 32)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("inspect", help="report the MoE blocks of a checkpoint from its config (no weights read)")
    p.add_argument("path", help="local checkpoint folder, or a Hub repo id")
    p.add_argument("--revision", help="Hub revision (repo ids only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.add_argument("--gpu", type=size(), help="device budget for a memory plan, e.g. 24GiB")
    p.add_argument("--ram", type=size(), help="host RAM budget for a memory plan, e.g. 64GiB")
    p.set_defaults(func=_inspect)


def _demo(args: argparse.Namespace) -> int:
    from .demo import build_demo_checkpoint, run_demo
    from .detect.table import human_count

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
        print(f"   prefill 4x128 tokens: reference {r.prefill_ms_reference:.1f} ms, patched {r.prefill_ms_patched:.1f} ms "
              f"({r.prefill_ms_reference / r.prefill_ms_patched:.2f}x)")
        print(f"   generate, per token: reference {r.decode_ms_reference:.2f} ms, patched {r.decode_ms_patched:.2f} ms "
              f"({r.decode_ms_reference / r.decode_ms_patched:.2f}x)")
        print(f"   params: total {human_count(report.total_params)}, active per token {human_count(report.active_params)}")
        ok = r.tokens_identical and r.max_rel_logit_diff <= 1e-5
    print("demo: OK" if ok else "demo: MISMATCH against the reference (please report this)")
    return 0 if ok else 1


def inspect_folder(folder, *, trust_remote_code: bool = False):
    """(MoEReport, CheckpointSummary) of a local checkpoint folder, from its config and index only."""
    from .families import inspect_model
    from .detect.config import load_config, meta_model, summarize_checkpoint

    config = load_config(folder, trust_remote_code=trust_remote_code)
    report = inspect_model(meta_model(config, trust_remote_code=trust_remote_code))
    return report, summarize_checkpoint(folder)


def _stored_format(folder: Path, report, summary) -> dict:
    """How the routed experts are stored (quantized formats: bytes per expert as stored and dequantized),
    from config.json alone; an unsupported quantization method is reported, not raised (inspect describes)."""
    from .errors import MoEConfigError
    from .formats import read_quantization_config

    try:
        raw = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config")
        spec = read_quantization_config(raw)
    except MoEConfigError as exc:
        return {"unsupported": f"{exc}".split(";")[0] + " (not offloadable by moe-patch)"}
    except (OSError, ValueError, AttributeError):
        return {}
    if spec is None or not report.blocks:
        return {}
    per_param = spec.expert_bytes_per_param()
    per_expert = max(b.params_per_expert for b in report.blocks)
    dequantized = summary.bytes_per_param
    return {"format": spec.describe(), "bytes_per_param": per_param,
            "expert_bytes": int(per_expert * per_param), "dequantized_expert_bytes": per_expert * dequantized,
            "total_bytes": int(report.routed_expert_params * per_param),
            "dequantized_total_bytes": report.routed_expert_params * dequantized}


def _inspect(args: argparse.Namespace) -> int:
    folder = Path(args.path)
    if not folder.is_dir():
        if folder.exists() or args.path.startswith((".", "/")) or args.path.count("/") != 1:
            from .errors import CheckpointError

            raise CheckpointError(f"{args.path}: not a checkpoint folder (and not a Hub repo id 'owner/name')")
        from hub_scripts.pull import fetch_metadata

        folder = fetch_metadata(args.path, revision=args.revision)
    report, summary = inspect_folder(folder, trust_remote_code=args.trust_remote_code)
    stored = _stored_format(folder, report, summary)
    plan = None
    if args.gpu or args.ram:
        from .offload import plan_memory

        plan = plan_memory(report, gpu=args.gpu, ram=args.ram, bytes_per_param=summary.bytes_per_param,
                           expert_bytes_per_param=stored.get("bytes_per_param"))
    if args.json:
        data = report.to_dict()
        data["checkpoint"] = {"shards": len(summary.shards), "total_bytes": summary.total_bytes,
                              "expert_storage": summary.expert_storage, "stored_format": stored}
        if plan is not None:
            data["memory_plan"] = dataclasses.asdict(plan)
        print(json.dumps(data, indent=2))
        return 0
    print(report)
    from .detect.table import human_bytes

    size = human_bytes(summary.total_bytes) if summary.total_bytes else "unknown size"
    print(f"  checkpoint: {len(summary.shards)} safetensors shards, {size}, experts stored as {summary.expert_storage}")
    if stored.get("format"):
        print(f"  stored format: {stored['format']}; {human_bytes(stored['expert_bytes'])} per expert "
              f"({human_bytes(stored['dequantized_expert_bytes'])} dequantized), {human_bytes(stored['total_bytes'])} "
              f"of routed experts ({human_bytes(stored['dequantized_total_bytes'])} dequantized)")
    elif stored.get("unsupported"):
        print(f"  stored format: {stored['unsupported']}")
    if plan is not None:
        print(plan)
    if not report.has_moe:
        print("  (no Mixture-of-Experts block: moe-patch has nothing to do for this model)")
    return 0
