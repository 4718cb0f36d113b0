"""`moe-patch batch PLAN.yaml`: upcycle and push several recipes; argument parsing and printing only (the plan
and its runner are :mod:`.batch_jobs`)."""

from __future__ import annotations

import argparse

EPILOG = """\
PLAN.yaml:
  defaults:                 # optional; merged into every job (a job's own keys win, recipes merge per key)
    private: true
    recipe: {top_k: 2, router_init: zero}
  jobs:
    - name: llama-8x2       # optional, defaults to the output folder's name
      source: meta-llama/Llama-3.2-1B     # dense checkpoint: local folder, or a Hub repo id (pulled
                                          # first; it becomes the card's base_model)
      output: out/llama-8x2               # relative paths are relative to the YAML file
      repo_id: my-user/llama-8x2          # optional: push when given
      recipe: {num_experts: 8, granularity: 1}
      branch: main          # optional push options: private, branch, create_pr, commit_message,
                            # base_model, license (card metadata)
    - source: ...

Each job runs `moe-patch upcycle` with its recipe (the keys are the upcycle options, with underscores),
then `moe-patch push` when it names a repo_id. Jobs run in order; the first failure stops the batch
unless --keep-going.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch",
        help="upcycle and push several recipes from one YAML file",
        description="Upcycle and push several recipes from one YAML file: each job converts its source,\n"
        "then pushes the result to the Hub when it names a repo_id.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipes", metavar="PLAN.yaml", help="YAML file with 'jobs' (and optional 'defaults')")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    p.add_argument("--keep-going", action="store_true", help="run the remaining jobs after a failure")
    p.add_argument("--skip-existing", action="store_true", help="reuse outputs that already hold a report")
    p.set_defaults(func=_batch)


def _batch(args: argparse.Namespace) -> int:
    from . import batch_jobs

    jobs = batch_jobs.load_plan(args.recipes)
    print(batch_jobs.format_plan(jobs))
    if args.dry_run:
        return 0
    results = batch_jobs.run_batch(jobs, keep_going=args.keep_going, skip_existing=args.skip_existing)
    for r in results:
        where = r.push.commit_url if r.push else (r.error or str(r.output))
        print(f"{r.status:>16}  {r.name}  {where}")
    not_run = len(jobs) - len(results)
    if not_run:
        print(f"{not_run} job(s) not run after the failure (use --keep-going to run them anyway).")
    return 0 if all(r.status != "failed" for r in results) and not not_run else 1
