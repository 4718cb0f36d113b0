"""`moe-patch inspect`: argument parsing and printing; the report is :func:`moe_patch.inspect_model` of a model built
on the meta device from config.json, with the checkpoint summary of :mod:`moe_patch.detect.config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from .args import int_at_least, size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="report the MoE blocks of a checkpoint from its config (no weights read)")
    p.add_argument("path", help="local checkpoint folder, or a Hub repo id")
    p.add_argument("--revision", help="Hub revision (repo ids only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    p.add_argument("--gpu", type=size(), help="device budget for a memory plan, e.g. 24GiB")
    p.add_argument("--ram", type=size(), help="host RAM budget for a memory plan, e.g. 64GiB")
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int_at_least(1),
        default=None,
        help="context the memory plan keeps KV cache and activations for (default: the model's, at most 4096 tokens)",
    )
    p.set_defaults(func=_inspect)


def inspect_folder(folder, *, trust_remote_code: bool = False, with_config: bool = False):
    """(MoEReport, CheckpointSummary) of a local checkpoint folder, from its config and index only (also the
    demo's), and its config with ``with_config``. It joins detect (config, index) and the families' finder,
    which imports detect: only a layer above both can call the two."""
    from ..detect.config import load_config, meta_model, summarize_checkpoint
    from ..families import inspect_model

    config = load_config(folder, trust_remote_code=trust_remote_code)
    report = inspect_model(meta_model(config, trust_remote_code=trust_remote_code))
    return (report, summarize_checkpoint(folder)) + ((config,) if with_config else ())


def _context_footprint(config, args: argparse.Namespace, dtype_bytes: float) -> dict:
    """The memory plan's context: ``--ctx-size`` (at most the model's) or the default, its KV cache and the
    activations of a prefill over it."""
    from ..errors import InvalidArgumentError
    from ..offload.auto_budget import default_context
    from ..offload.footprint import activation_bytes, kv_cache_elements, model_context

    model = model_context(config)
    if args.ctx_size and model and args.ctx_size > model:
        raise InvalidArgumentError(
            f"--ctx-size {args.ctx_size}: the model's context is {model} tokens; give at most {model}."
        )
    tokens = args.ctx_size or default_context(config)
    elements, exact = kv_cache_elements(config, tokens, trust_remote_code=args.trust_remote_code)
    return {
        "context_tokens": tokens,
        "kv_cache_bytes": int(elements * dtype_bytes),
        "kv_exact": exact,
        "activation_bytes": activation_bytes(config, tokens, dtype_bytes),
    }


def _stored_format(folder: Path, report, summary) -> dict:
    """How the routed experts are stored (quantized formats: bytes per expert as stored and dequantized),
    from config.json alone; an unsupported quantization method is reported, not raised (inspect describes)."""
    from ..errors import MoEConfigError
    from ..formats import read_quantization_config

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
    return {
        "format": spec.describe(),
        "bytes_per_param": per_param,
        "expert_bytes": int(per_expert * per_param),
        "dequantized_expert_bytes": per_expert * dequantized,
        "total_bytes": int(report.routed_expert_params * per_param),
        "dequantized_total_bytes": report.routed_expert_params * dequantized,
    }


def _inspect(args: argparse.Namespace) -> int:
    folder = Path(args.path)
    if not folder.is_dir():
        if folder.exists() or args.path.startswith((".", "/")) or args.path.count("/") != 1:
            from ..errors import CheckpointError

            raise CheckpointError(f"{args.path}: not a checkpoint folder (and not a Hub repo id 'owner/name')")
        from hub_scripts.pull import fetch_metadata

        folder = fetch_metadata(args.path, revision=args.revision)
    report, summary, config = inspect_folder(folder, trust_remote_code=args.trust_remote_code, with_config=True)
    stored = _stored_format(folder, report, summary)
    plan = None
    if args.gpu or args.ram:
        from ..offload import plan_memory

        plan = plan_memory(
            report,
            gpu=args.gpu,
            ram=args.ram,
            bytes_per_param=summary.bytes_per_param,
            expert_bytes_per_param=stored.get("bytes_per_param"),
            **_context_footprint(config, args, summary.bytes_per_param),
        )
    if args.json:
        data = report.to_dict()
        data["checkpoint"] = {
            "shards": len(summary.shards),
            "total_bytes": summary.total_bytes,
            "expert_storage": summary.expert_storage,
            "stored_format": stored,
        }
        if plan is not None:
            data["memory_plan"] = dataclasses.asdict(plan)
        print(json.dumps(data, indent=2))
        return 0
    print(report)
    from ..detect.table import human_bytes

    size = human_bytes(summary.total_bytes) if summary.total_bytes else "unknown size"
    print(f"  checkpoint: {len(summary.shards)} safetensors shards, {size}, experts stored as {summary.expert_storage}")
    if stored.get("format"):
        print(
            f"  stored format: {stored['format']}; {human_bytes(stored['expert_bytes'])} per expert "
            f"({human_bytes(stored['dequantized_expert_bytes'])} dequantized), {human_bytes(stored['total_bytes'])} "
            f"of routed experts ({human_bytes(stored['dequantized_total_bytes'])} dequantized)"
        )
    elif stored.get("unsupported"):
        print(f"  stored format: {stored['unsupported']}")
    if plan is not None:
        print(plan)
    if not report.has_moe:
        print("  (no Mixture-of-Experts block: moe-patch has nothing to do for this model)")
    return 0
