"""Download models from the Hub: whole snapshots (`pull`) or just what `inspect` needs (`fetch_metadata`).

Both wrap `snapshot_download`, which writes each file to a `.incomplete` temp file and renames it when
complete, so an interrupted pull leaves no half-written file under its final name and a re-run resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.utils import filter_repo_objects

from moe_patch.errors import MoEPatchError, OutputError

from .api import check_repo_id, make_api
from .errors import HubError, hub_errors

logger = logging.getLogger(__name__)

# What `moe-patch inspect REPO_ID` reads: the MoE layout from config.json and tensor names, dtypes and
# shard sizes from the index. No weights.
METADATA_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    include: Sequence[str] | str | None = None,
    local_dir: str | Path | None = None,
    api: HfApi | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download `repo_id` (files matching `include` glob patterns, all files by default) and return the folder.

    Files land in the huggingface_hub cache (shared with transformers) unless `local_dir` is given.
    An `include` that matches no file of the repository is an error listing what the repository holds.
    """
    check_repo_id(repo_id)
    patterns = [include] if isinstance(include, str) else (list(include) if include else None)
    api = api or make_api()
    with hub_errors(repo_id, endpoint=api.endpoint, action="download", revision=revision):
        if patterns and not constants.is_offline_mode():  # offline, snapshot_download answers from the cache
            remote = api.list_repo_files(repo_id, revision=revision)
            if not list(filter_repo_objects(remote, allow_patterns=patterns)):
                shown = ", ".join(sorted(remote)[:10]) + (" ..." if len(remote) > 10 else "")
                raise HubError(
                    f"No file of '{repo_id}' matches --include {' '.join(patterns)}. The repository holds: {shown}"
                )
        try:
            path = api.snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_dir=local_dir, cache_dir=cache_dir
            )
        except OSError as exc:
            if isinstance(exc, (MoEPatchError, ConnectionError, TimeoutError)) or exc.errno is None:
                raise  # a HubError, or the network: hub_errors' business
            where = local_dir if local_dir is not None else (cache_dir or "the Hugging Face cache")
            raise OutputError(
                f"{exc.filename or where}: cannot write the download ({exc.strerror}). "
                "Check the folder (--local-dir) and free space."
            ) from exc
    return Path(path)


def fetch_metadata(
    repo_id: str,
    *,
    revision: str | None = None,
    api: HfApi | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download only config.json, generation_config.json (if any) and model.safetensors.index.json (if any).

    Returns the local snapshot folder holding them. A repository without config.json is an error: it
    is not a transformers model.
    """
    check_repo_id(repo_id)
    api = api or make_api()
    with hub_errors(repo_id, endpoint=api.endpoint, action="inspect", revision=revision):
        path = Path(
            api.snapshot_download(repo_id, revision=revision, allow_patterns=list(METADATA_FILES), cache_dir=cache_dir)
        )
    if not (path / "config.json").is_file():
        raise HubError(f"'{repo_id}' has no config.json at its root: it is not a transformers model checkpoint.")
    return path
