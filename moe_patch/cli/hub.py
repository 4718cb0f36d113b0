"""`moe-patch push` and `moe-patch pull`: argument parsing and printing only; the work is in
:mod:`hub_scripts.push` and :mod:`hub_scripts.pull`."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from ..sizes import format_bytes
from .args import new_folder

if TYPE_CHECKING:
    from hub_scripts.push import PushResult


def _quiet_http_logs(args: argparse.Namespace) -> None:
    # The root logger is at INFO for our messages; the HTTP client logs every request at INFO too.
    level = logging.NOTSET if getattr(args, "debug", False) else logging.WARNING
    for name in ("httpx2", "httpx", "httpcore2", "httpcore"):
        logging.getLogger(name).setLevel(level)


def _print_push(result: PushResult) -> None:
    if result.dry_run:
        where = f"{result.repo_id}@{result.branch}" if result.branch else result.repo_id
        print(
            f"Dry run: would push {len(result.files)} files ({format_bytes(result.total_bytes)}) to {where}"
            f"{' (private)' if result.private else ''}:"
        )
        for path, size in result.files:
            print(f"  {size:>12,d}  {path}")
        label = {"written": "generated", "regenerated": "regenerated", "kept": "your README.md, kept"}.get(
            result.card_action, "none"
        )
        print(f"Model card ({label}):")
        print(result.card_text or "(no README.md)")
        return
    if result.card_action == "kept":
        print("Kept your README.md (use --overwrite-card to replace it with a generated card).")
    print(f"Pushed {len(result.files)} files ({format_bytes(result.total_bytes)}) to {result.repo_url}")
    if result.pr_url:
        print(f"Pull request: {result.pr_url}")
    print(f"Commit: {result.commit_url}")


def _push(args: argparse.Namespace) -> int:
    from hub_scripts.push import push_folder  # lazy: `moe-patch --help` must not import torch through the card code

    _quiet_http_logs(args)
    result = push_folder(
        args.folder,
        args.repo_id,
        private=args.private,
        branch=args.branch,
        create_pr=args.create_pr,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        write_card=not args.no_card,
        overwrite_card=args.overwrite_card,
        base_model=args.base_model,
        license=args.license,
    )
    _print_push(result)
    return 0


def _pull(args: argparse.Namespace) -> int:
    from hub_scripts.pull import pull

    _quiet_http_logs(args)
    path = pull(args.repo_id, revision=args.revision, include=args.include, local_dir=args.local_dir)
    print(path)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `push` and `pull` to the `moe-patch` command."""
    p = subparsers.add_parser(
        "push",
        help="upload a checkpoint folder to the Hugging Face Hub with a generated model card",
        description="Create the repository if needed, write README.md (model card) unless you wrote one, and"
        " upload the folder. Re-running after an interruption uploads only what is missing."
        " Endpoint from HF_ENDPOINT, token from HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("folder", help="checkpoint folder (config.json, *.safetensors, ...)")
    p.add_argument("repo_id", help="target repository, 'namespace/name'")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--branch", help="push to this branch (created from main if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request against main instead of committing")
    p.add_argument("--commit-message", help="commit title (default: 'Upload MoE checkpoint with moe-patch')")
    p.add_argument("--dry-run", action="store_true", help="list files, sizes and the model card; no network, no writes")
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md you wrote with a generated card")
    p.add_argument("--no-card", action="store_true", help="do not write a model card")
    p.add_argument(
        "--base-model",
        metavar="REPO_ID",
        help="card metadata: the source model on the Hub (when the"
        " checkpoint was converted from a local folder, moe-patch cannot know it)",
    )
    p.add_argument("--license", help="card metadata: license id, e.g. apache-2.0 (default: the source card's)")
    p.set_defaults(func=_push)

    q = subparsers.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub (into the shared cache or --local-dir)",
        description="Wraps huggingface_hub.snapshot_download; prints the local folder.",
    )
    q.add_argument("repo_id", help="repository, 'namespace/name'")
    q.add_argument("--revision", help="branch, tag or commit (default: main)")
    q.add_argument("--include", nargs="+", metavar="PATTERN", help="only files matching these glob patterns")
    q.add_argument("--local-dir", type=new_folder, help="download into this folder instead of the cache")
    q.set_defaults(func=_pull)
