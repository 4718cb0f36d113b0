"""Push a checkpoint folder to the Hub: create the repo, add a model card, upload with `upload_folder`.

`upload_folder` resumes by itself: files whose content is already on the Hub (a previous, interrupted
run uploaded them) are not sent again, so the answer to any failed upload is "run the same command".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

from moe_patch import atomic
from moe_patch.errors import CheckpointError
from moe_patch.io import read_header, read_index, read_shards
from moe_patch.sizes import format_bytes as human_bytes  # the package's one byte formatter

from .api import check_repo_id, make_api
from .card import CARD_FILE, build_model_card, check_config, is_generated_card
from .errors import HubAuthError, HubError, UploadInterruptedError, hub_errors

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload MoE checkpoint with moe-patch"
RERUN = "Re-run the conversion."  # what to do about a checkpoint that fails the checks before a push


@dataclass
class PushResult:
    """What a push did (or, with dry_run, would do)."""

    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes), README.md included when a card is written
    card_action: str  # "written", "regenerated", "kept" (the user's README.md), "none"
    card_text: str | None = None
    dry_run: bool = False
    repo_url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    branch: str | None = None
    private: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def __str__(self) -> str:
        what = f"{len(self.files)} files ({human_bytes(self.total_bytes)})"
        if self.dry_run:
            return f"{self.repo_id}: would push {what} (dry run)"
        return f"{self.pr_url or self.commit_url} ({what})"


def list_upload_files(folder: Path) -> list[tuple[str, int]]:
    """Files `upload_folder` would send (same ignore rules: .git, .cache/huggingface), sorted."""
    paths = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    kept = filter_repo_objects(paths.keys(), ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    return [(rel, paths[rel].stat().st_size) for rel in kept]


def check_checkpoint_files(folder: Path, files: Iterable[str] | None = None) -> None:
    """Refuse to publish safetensors that a loader would refuse, naming the file and the tensor.

    Every ``*.safetensors`` file among ``files`` (default: what would be uploaded) goes through the
    package's one header reader (``moe_patch.io.read_header``: the header parses, each tensor's byte
    range lies inside the file), and every ``*.safetensors.index.json`` must agree with its shards
    (``moe_patch.io.read_shards``): each listed shard present, each listed tensor in its shard, no
    unlisted tensor.
    """
    rels = [rel for rel, _ in list_upload_files(folder)] if files is None else list(files)
    checked: set[Path] = set()
    for rel in (r for r in rels if r.endswith(".safetensors.index.json")):
        index = read_index(folder / rel)
        read_shards(index, complete=True, advice=RERUN)
        checked.update(index.folder / shard for shard in index.shards)
    for rel in rels:
        if rel.endswith(".safetensors") and folder / rel not in checked:
            read_header(folder / rel)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _write_card(readme: Path, text: str) -> Callable[[], None]:
    """Write the card atomically; return the function that puts back what was there before."""
    previous = readme.read_bytes() if readme.exists() else None
    atomic.write_bytes(readme, text.encode("utf-8"))

    def restore() -> None:
        if previous is None:
            readme.unlink(missing_ok=True)
        else:
            atomic.write_bytes(readme, previous)

    return restore


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
    write_card: bool = True,
    overwrite_card: bool = False,
    base_model: str | None = None,
    license: str | None = None,
) -> PushResult:
    """Upload the checkpoint in `folder` to `repo_id` and return what was done.

    Creates the repository when needed (private if asked; an existing public repo is never pushed to
    with `private=True`), writes README.md from `build_model_card` unless the folder has one the user
    wrote (`overwrite_card=True` replaces it; `write_card=False` never writes one), then uploads with
    `upload_folder` to `branch` (created from main if missing) or as a pull request (`create_pr`).
    `dry_run` lists files, sizes and the card without writing anything or touching the network.
    `base_model` / `license` go into the card's metadata when the report and source card do not say.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder: pass the checkpoint folder to push.")
    check_repo_id(repo_id)
    if create_pr and branch not in (None, "main"):
        raise HubError(
            f"--create-pr opens a pull request against main; it cannot be combined with --branch {branch}."
            " Drop one of the two options."
        )
    readme = folder / CARD_FILE
    atomic.clean_leftovers(readme)  # a card write killed mid-way must not be uploaded
    on_disk = list_upload_files(folder)
    check_checkpoint_files(folder, [rel for rel, _ in on_disk])  # before anything is written or sent
    check_config(folder)
    card_text: str | None = None
    if not write_card:
        card_action = "kept" if readme.exists() else "none"
    elif readme.exists() and not overwrite_card and not is_generated_card(readme):
        card_action = "kept"
        logger.info("Keeping the README.md you wrote (pass --overwrite-card to replace it with a generated card).")
    else:
        card_action = "regenerated" if readme.exists() else "written"
        if base_model is not None:
            check_repo_id(base_model)
        card_text = str(build_model_card(folder, repo_id=repo_id, base_model=base_model, license=license))

    files = [(p, s) for p, s in on_disk if not (card_text is not None and p == CARD_FILE)]
    if card_text is not None:
        files = sorted(files + [(CARD_FILE, len(card_text.encode("utf-8")))])
    result = PushResult(
        repo_id=repo_id,
        files=files,
        card_action=card_action,
        card_text=card_text if card_text is not None else (readme.read_text("utf-8") if readme.exists() else None),
        dry_run=dry_run,
        branch=branch,
        private=private,
    )
    if dry_run:
        return result

    api = api or make_api()
    # The card is written first (a read-only folder fails before any request) and taken back if the
    # push fails: the user's folder is left as it was.
    restore_card = _write_card(readme, card_text) if card_text is not None else None
    try:
        info = _upload(
            api,
            folder,
            repo_id,
            result,
            private=private,
            branch=branch,
            create_pr=create_pr,
            commit_message=commit_message,
        )
    except BaseException:
        if restore_card is not None:
            restore_card()
        raise
    result.commit_url = info.commit_url
    result.commit_oid = info.oid
    result.pr_url = info.pr_url
    return result


def _upload(
    api: HfApi,
    folder: Path,
    repo_id: str,
    result: PushResult,
    *,
    private: bool,
    branch: str | None,
    create_pr: bool,
    commit_message: str | None,
) -> CommitInfo:
    """Create the repo (and branch) and upload the folder; every failure is a one-line HubError."""
    files = result.files
    with hub_errors(repo_id, endpoint=api.endpoint, action="push to"):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        result.repo_url = str(repo_url)
        if private and api.repo_info(repo_id).private is False:
            raise HubError(
                f"'{repo_id}' already exists and is public; --private does not change an existing repository."
                " Make it private in its settings on the Hub first, or push without --private."
            )
        if branch and branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        logger.info(
            "Uploading %d files (%s) to %s%s",
            len(files),
            human_bytes(result.total_bytes),
            repo_id,
            f"@{branch}" if branch else (" as a pull request" if create_pr else ""),
        )
        try:
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=branch,
                create_pr=create_pr,
                commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            )
        except OfflineModeIsEnabled:
            raise  # hub_errors explains HF_HUB_OFFLINE
        except PermissionError as exc:
            if type(exc).__module__ != "hf_xet":
                raise
            raise HubAuthError(
                f"The Hub refused the storage token for '{repo_id}' ({exc}): check that your token has write access."
            ) from exc
        except (RuntimeError, ConnectionError) as exc:
            # A failed transfer: huggingface_hub wraps LFS failures as RuntimeError("Error while uploading
            # '<file>' to the Hub."), hf_xet raises ConnectionError("Network error: ...").
            cause = exc.__cause__
            detail = _first_line(exc) + (f" ({type(cause).__name__}: {_first_line(cause)})" if cause else "")
            raise UploadInterruptedError(
                f"Upload to '{repo_id}' did not complete: {detail}."
                " Run the same command again to resume: files already on the Hub are not sent again."
            ) from exc
        except ValueError as exc:  # invalid README.md metadata, malformed server replies
            hint = " Fix the YAML header of README.md, or pass --overwrite-card." if "README.md" in str(exc) else ""
            raise HubError(f"Could not push to '{repo_id}': {' '.join(str(exc).split())}{hint}") from exc
    return info
