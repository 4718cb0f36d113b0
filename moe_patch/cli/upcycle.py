"""`moe-patch upcycle`: parse arguments, call :func:`converters.upcycle`, print the result. No logic here.

``--push-to-hub`` is wiring between two areas (the converter, then :func:`hub_scripts.push.push_folder`), so
it lives here: converters and hub_scripts do not import each other."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MoEPatchError
from .args import size

EPILOG = """\
exact recipes (default): plain copies (--granularity 1) and fine-grained experts with renormalised
top-k are exact at init; --verify (on by default) proves it on the written checkpoint.
examples:
  moe-patch upcycle ./llama-1b ./llama-1b-8x --num-experts 8 --top-k 2
  moe-patch upcycle ./qwen2-0.5b ./qwen2-moe --num-experts 24 --top-k 6 --granularity 4 --shared-experts 1 \
      --moe-layers every-2
  moe-patch upcycle ./base ./btx --experts-from ./base ./math-ft ./code-ft --top-k 2
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "upcycle",
        help="turn a dense checkpoint into a stock MoE checkpoint (exact at init)",
        description="Upcycle a dense Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3, OLMo2) into a "
        "Mixture-of-Experts checkpoint of a stock transformers class (Mixtral, Qwen2-MoE, Qwen3-MoE, FlexOlmo).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="local dense model folder (config.json + safetensors)")
    p.add_argument("out", type=Path, help="output folder (written atomically)")
    g = p.add_argument_group("experts")
    g.add_argument(
        "--num-experts",
        type=int,
        metavar="N",
        help="routed experts per MoE layer (derived for --experts-from/--lora-experts)",
    )
    g.add_argument("--top-k", type=int, default=2, metavar="K", help="routed experts per token (default 2)")
    g.add_argument(
        "--target",
        default="auto",
        metavar="ARCH",
        help="auto|mixtral|qwen2_moe|qwen3_moe|flex_olmo (default: by source)",
    )
    g.add_argument(
        "--granularity", type=int, default=1, metavar="G", help="G: split each FFN into G neuron slices (default 1)"
    )
    g.add_argument(
        "--shared-experts",
        type=int,
        default=0,
        metavar="S",
        help="S of the G slices form the shared expert (qwen2_moe)",
    )
    g.add_argument(
        "--moe-layers",
        default="all",
        metavar="SPEC",
        help="all | every-N | comma-separated layer indices (default all)",
    )
    r = p.add_argument_group("router")
    r.add_argument(
        "--router-init",
        default="random",
        choices=["zero", "random", "kmeans", "pca"],
        help="router rows: zero, random (seeded, default), or from --calibration data (kmeans, pca)",
    )
    r.add_argument(
        "--router-std", type=float, metavar="STD", help="std of the random router (default: config initializer_range)"
    )
    r.add_argument(
        "--calibration", type=Path, metavar="FILE", help="text file (tokenised with SRC's tokenizer) or token-id file"
    )
    r.add_argument("--calibration-format", default="auto", choices=["auto", "text", "ids"])
    r.add_argument(
        "--calibration-tokens", type=int, default=4096, metavar="T", help="tokens used for kmeans/pca (default 4096)"
    )
    d = p.add_argument_group("diversity (not exact by design)")
    d.add_argument(
        "--drop-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="drop-upcycling: re-initialise this fraction of neurons",
    )
    d.add_argument(
        "--noise", type=float, default=0.0, metavar="STD", help="Gaussian noise, std relative to each tensor's std"
    )
    d.add_argument("--experts-from", nargs="+", type=Path, default=[], metavar="MODEL", help="Branch-Train-MiX sources")
    d.add_argument("--lora-experts", nargs="+", type=Path, default=[], metavar="ADAPTER", help="peft LoRA adapters")
    o = p.add_argument_group("output")
    o.add_argument(
        "--dtype", default="auto", metavar="DTYPE", help="auto|float32|bfloat16|float16 (default: the source's)"
    )
    o.add_argument(
        "--max-shard-size",
        type=size(minimum=1),
        default="5GB",
        metavar="SIZE",
        help="e.g. 5GB, 500MB, 2GiB (default 5GB)",
    )
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--dry-run", action="store_true", help="read configs and headers only; print the plan")
    o.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True, help="compare with the dense model")
    o.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    h = p.add_argument_group("publish")
    h.add_argument("--push-to-hub", metavar="REPO_ID", help="after success, upload OUT to this Hub repo")
    h.add_argument("--private", action="store_true", help="create the Hub repo as private")
    h.add_argument("--commit-message", metavar="TEXT", help="Hub commit message")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None):
    from converters import UpcycleConfig

    layers = args.moe_layers
    return UpcycleConfig(
        num_experts=args.num_experts,
        top_k=args.top_k,
        target=args.target,
        granularity=args.granularity,
        shared_experts=args.shared_experts,
        moe_layers=layers,
        router_init=args.router_init,
        router_std=args.router_std,
        calibration=args.calibration,
        calibration_format=args.calibration_format,
        calibration_tokens=args.calibration_tokens,
        drop_ratio=args.drop_ratio,
        noise=args.noise,
        experts_from=list(args.experts_from),
        lora_experts=list(args.lora_experts),
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        seed=args.seed,
        verify=args.verify,
        overwrite=args.overwrite,
        argv=argv,
    )


def run(args: argparse.Namespace) -> int:
    from converters import plan_upcycle, upcycle

    config = config_from_args(args)
    if args.push_to_hub and not args.dry_run:
        # both before hours of conversion, not after: a bad repo id, and a Hub module that cannot be imported
        from hub_scripts.api import check_repo_id
        from hub_scripts.push import push_folder

        check_repo_id(args.push_to_hub)
    if args.dry_run:
        plan = plan_upcycle(args.src, config)
        try:
            print(plan.summary())
            if args.out.exists() and not args.overwrite:
                print(f"  note: {args.out} exists; the real run needs --overwrite")
        finally:
            plan.weights.close()
        return 0
    report = upcycle(args.src, args.out, config)
    print(report)
    if report.verification and not report.verification["passed"]:
        print(
            f"note: not exact by design ({'; '.join(report.recipe['inexact_reasons'])}); measured divergence above.",
            file=sys.stderr,
        )
    if args.push_to_hub:
        # the model card is made from OUT/upcycle_report.json
        url = push_folder(args.out, args.push_to_hub, private=args.private, commit_message=args.commit_message)
        print(f"pushed to {url}")
    return 0


__all__ = ["MoEPatchError", "config_from_args", "register", "run"]
