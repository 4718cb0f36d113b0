"""Publishing an upcycled folder: a thin, lazy bridge to ``hub_scripts.push`` (which owns Hub I/O)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_patch.errors import MoEPatchError


class HubUnavailableError(MoEPatchError):
    """--push-to-hub was asked for but the Hub publishing module cannot be imported."""


def push_output(out_dir: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> Any:
    """Upload ``out_dir`` (with its upcycle_report.json, from which the model card is made) to ``repo_id``."""
    try:
        from hub_scripts.push import push_folder
    except ImportError as exc:
        raise HubUnavailableError(
            f"--push-to-hub {repo_id}: the Hub publishing module is unavailable ({exc}); the model is saved in "
            f"{out_dir}, push it later with `moe-patch push {out_dir} {repo_id}`."
        ) from None
    return push_folder(Path(out_dir), repo_id, private=private, commit_message=commit_message)
