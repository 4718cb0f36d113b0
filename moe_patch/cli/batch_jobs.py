"""Upcycle and push several recipes from one YAML file (`moe-patch batch recipes.yaml`): the plan and its runner.

The file's format: `moe-patch batch --help` (moe_patch/cli/batch.py). Each job runs the converter, then
`push_folder`. The converter is called through one small interface,
`upcycle(source: str, output: Path, **recipe, argv=[...]) -> object`: the recipe keys go through as
keyword arguments unchanged (they are `converters.UpcycleConfig` fields), and `argv` is the equivalent
`moe-patch upcycle ...` command line, recorded in the report and shown on the model card. It is
`converters.upcycle`, imported when the batch runs (see `find_upcycle`), or passed in by a caller.
Jobs run in order; the first failure stops the batch unless `--keep-going`. `--skip-existing` reuses
outputs that already hold an `upcycle_report.json` (a re-run after a failure only redoes what is missing;
pushes resume on their own).

This module drives converters and hub_scripts together, so it stands above both, in the command-line
layer: neither package imports the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hub_scripts.api import check_repo_id
from hub_scripts.card import REPORT_FILE
from hub_scripts.pull import pull
from hub_scripts.push import PushResult, push_folder

from ..errors import MoEPatchError

logger = logging.getLogger(__name__)

UpcycleFn = Callable[..., Any]
PUSH_KEYS = ("private", "branch", "create_pr", "commit_message", "base_model", "license")
JOB_KEYS = {"name", "source", "output", "repo_id", "recipe", *PUSH_KEYS}
# What a conversion reads from a source pulled from the Hub (no *.bin / *.pth duplicates of the weights).
SOURCE_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "README.md")


class BatchConfigError(MoEPatchError, ValueError):
    """The batch YAML file is malformed: names the file, the job and the field."""


@dataclass
class BatchJob:
    """One recipe: convert `source` into `output`, then push to `repo_id` when given."""

    name: str
    source: str
    output: Path
    recipe: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    push_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    name: str
    status: str  # "done", "skipped-existing", "failed"
    output: Path
    push: PushResult | None = None
    error: str | None = None


def _resolve_source(source: str, base: Path) -> str:
    # A relative path that exists next to the YAML file is a local folder; anything else (a repo id) is kept.
    candidate = base / source
    return str(candidate) if not Path(source).is_absolute() and candidate.exists() else source


def _recipe_keys() -> set[str]:
    """The converter's option names (its UpcycleConfig fields), so a typo fails in --dry-run too."""
    import dataclasses

    from converters import UpcycleConfig

    return {f.name for f in dataclasses.fields(UpcycleConfig)} - {"argv"}


def load_plan(path: str | Path) -> list[BatchJob]:
    """Parse and check the YAML file; every problem is a `BatchConfigError` naming job and field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BatchConfigError(f"Cannot read batch file {path}: {exc.strerror or exc}.") from exc
    except yaml.YAMLError as exc:
        raise BatchConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise BatchConfigError(f"{path} must be a mapping with a non-empty 'jobs' list (see `moe-patch batch --help`).")
    unknown_top = set(data) - {"defaults", "jobs"}
    if unknown_top:
        raise BatchConfigError(
            f"{path}: unknown top-level key(s) {sorted(unknown_top)}; expected 'defaults' and 'jobs'."
        )
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise BatchConfigError(f"{path}: 'defaults' must be a mapping, got {type(defaults).__name__}.")
    base = path.parent
    jobs: list[BatchJob] = []
    for i, raw in enumerate(data["jobs"]):
        where = f"{path}: jobs[{i}]"
        if not isinstance(raw, dict):
            raise BatchConfigError(f"{where} must be a mapping, got {type(raw).__name__}.")
        for label, recipe in (("defaults.recipe", defaults.get("recipe")), (f"jobs[{i}].recipe", raw.get("recipe"))):
            if recipe is not None and not isinstance(recipe, dict):
                raise BatchConfigError(f"{path}: {label}: 'recipe' must be a mapping of converter options.")
        merged = {**defaults, **raw}
        merged["recipe"] = {**(defaults.get("recipe") or {}), **(raw.get("recipe") or {})}
        unknown = set(merged) - JOB_KEYS
        if unknown:
            raise BatchConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(JOB_KEYS)}.")
        recipe_keys = _recipe_keys()
        bad = sorted(set(merged["recipe"]) - recipe_keys)
        if bad:
            raise BatchConfigError(f"{where}.recipe: unknown option(s) {bad}; allowed: {sorted(recipe_keys)}.")
        for key in ("source", "output"):
            if not isinstance(merged.get(key), str) or not merged[key].strip():
                raise BatchConfigError(f"{where}: '{key}' is required (a path or repo id string).")
        repo_id = merged.get("repo_id")
        if repo_id is not None:
            try:
                check_repo_id(repo_id)
            except MoEPatchError as exc:
                raise BatchConfigError(f"{where}: repo_id: {exc}") from exc
        output = Path(merged["output"]).expanduser()
        output = output if output.is_absolute() else base / output
        name = merged.get("name") or output.name
        jobs.append(
            BatchJob(
                name=str(name),
                source=_resolve_source(merged["source"], base),
                output=output,
                recipe=merged["recipe"],
                repo_id=repo_id,
                push_options={k: merged[k] for k in PUSH_KEYS if merged.get(k) is not None},
            )
        )
    for attr in ("name", "output"):
        seen: dict[Any, int] = {}
        for i, job in enumerate(jobs):
            value = getattr(job, attr)
            if value in seen:
                raise BatchConfigError(f"{path}: jobs[{seen[value]}] and jobs[{i}] have the same {attr} '{value}'.")
            seen[value] = i
    return jobs


def _is_repo_id(text: str) -> bool:
    try:
        check_repo_id(text)
        return True
    except MoEPatchError:
        return False


def equivalent_command(job: BatchJob) -> list[str]:
    """The `moe-patch upcycle` command line that runs the same recipe (option names are the config fields)."""
    argv = ["moe-patch", "upcycle", job.source, str(job.output)]
    for key, value in job.recipe.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append(f"--no-{key.replace('_', '-')}")
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            # moe_layers is one comma-separated value on the command line; source lists are several values.
            argv += [flag, ",".join(map(str, value))] if key == "moe_layers" else [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def find_upcycle() -> UpcycleFn:
    """The converter's library entry point, `converters.upcycle(src, out, config=None, **config_fields)`."""
    from converters import upcycle

    return upcycle


def resolve_source(job: BatchJob, api: Any = None) -> str:
    """The local folder to convert: the source itself, or for a Hub repo id its snapshot, pulled first.

    Only what a conversion reads is downloaded (configs, safetensors, tokenizer files, the card).
    """
    if Path(job.source).exists():
        return job.source
    try:
        check_repo_id(job.source)
    except MoEPatchError as exc:
        raise BatchConfigError(
            f"[{job.name}] source '{job.source}' is neither an existing folder nor a Hub repo id ('owner/name')."
        ) from exc
    logger.info("[%s] downloading %s", job.name, job.source)
    return str(pull(job.source, include=list(SOURCE_FILES), api=api))


def run_batch(
    jobs: Sequence[BatchJob],
    *,
    upcycle: UpcycleFn | None = None,
    push: Callable[..., PushResult] = push_folder,
    keep_going: bool = False,
    skip_existing: bool = False,
    api: Any = None,
) -> list[JobResult]:
    """Convert then push each job in order; returns one `JobResult` per job that ran."""
    results: list[JobResult] = []
    for job in jobs:
        try:
            if skip_existing and (job.output / REPORT_FILE).is_file():
                status = "skipped-existing"
                logger.info("[%s] %s already converted, reusing it", job.name, job.output)
            else:
                fn = upcycle or find_upcycle()
                source = resolve_source(job, api)
                logger.info("[%s] upcycling %s -> %s", job.name, job.source, job.output)
                fn(source, job.output, **{"argv": equivalent_command(job), **job.recipe})
                status = "done"
            pushed = None
            if job.repo_id:
                options = dict(job.push_options)
                if _is_repo_id(job.source) and not Path(job.source).exists():
                    options.setdefault("base_model", job.source)  # the card links the source model
                pushed = push(job.output, job.repo_id, api=api, **options)
                logger.info("[%s] pushed: %s", job.name, pushed.commit_url)
            results.append(JobResult(job.name, status, job.output, pushed))
        except MoEPatchError as exc:
            results.append(JobResult(job.name, "failed", job.output, error=str(exc)))
            logger.error("[%s] failed: %s", job.name, exc)
            if not keep_going:
                break
    return results


def format_plan(jobs: Sequence[BatchJob]) -> str:
    lines = []
    for job in jobs:
        recipe = ", ".join(f"{k}={v}" for k, v in job.recipe.items()) or "converter defaults"
        push = f" -> push {job.repo_id}" + (f" {job.push_options}" if job.push_options else "") if job.repo_id else ""
        lines.append(f"{job.name}: {job.source} -> {job.output} [{recipe}]{push}")
    return "\n".join(lines)
