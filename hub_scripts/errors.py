"""Hub errors, and the one place that turns huggingface_hub / network exceptions into them.

Every message names the repository (and endpoint when it matters) and says what to do next. No
message ever contains a token: they are built from repo ids, URLs and the server's own message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx2
from huggingface_hub import constants
from huggingface_hub import errors as hf_errors

from moe_patch.errors import MoEPatchError


class HubError(MoEPatchError):
    """Talking to the Hugging Face Hub (or an HF_ENDPOINT mirror) failed."""


class InvalidRepoIdError(HubError, ValueError):
    """A repository id is not of the form `namespace/name` (letters, digits, '-', '_', '.')."""


class RepoNotFoundError(HubError):
    """The repository does not exist, or it is private and the token cannot see it."""


class RevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist in the repository."""


class HubAuthError(HubError, PermissionError):
    """No token, an invalid token, or a token without the needed rights."""


class HubConnectionError(HubError, ConnectionError):
    """The Hub endpoint could not be reached (network down, wrong HF_ENDPOINT, timeout)."""


class UploadInterruptedError(HubError):
    """An upload stopped before its commit: nothing was committed, a re-run resumes it."""


def _server_message(exc: hf_errors.HfHubHTTPError) -> str:
    msg = (getattr(exc, "server_message", None) or "").strip()
    return f" Server said: {msg}" if msg else ""


@contextlib.contextmanager
def hub_errors(repo_id: str, *, endpoint: str, action: str, revision: str | None = None) -> Iterator[None]:
    """Run a block of Hub calls, re-raising library and network errors as short `HubError`s.

    `action` is a verb phrase for the message ("push to", "download"); the original exception stays
    chained (`raise ... from`) so `--debug` still shows the full story.
    """
    rev = f" at revision '{revision}'" if revision else ""
    try:
        yield
    except HubError:
        raise
    except hf_errors.HFValidationError as exc:
        raise InvalidRepoIdError(
            f"'{repo_id}' is not a valid repository id: {exc}. Use 'namespace/name', e.g. 'my-user/my-moe'."
        ) from exc
    except hf_errors.GatedRepoError as exc:
        raise HubAuthError(
            f"'{repo_id}' is gated on {endpoint}: request access on its page, then use a token of the account"
            " that was granted access (HF_TOKEN or `hf auth login`)."
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise RepoNotFoundError(
            f"Repository '{repo_id}' not found on {endpoint} (or it is private and your token cannot see it)."
            " Check the id, and log in with `hf auth login` or set HF_TOKEN for private repositories."
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise RevisionNotFoundError(
            f"Revision '{revision}' not found in '{repo_id}' on {endpoint}: check the branch, tag or commit name."
        ) from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        # snapshot_download's way of saying "the Hub did not answer properly and nothing is cached".
        cause = exc.__cause__
        if isinstance(cause, hf_errors.OfflineModeIsEnabled) or constants.is_offline_mode():
            raise HubConnectionError(
                f"Could not {action} '{repo_id}'{rev}: HF_HUB_OFFLINE is set and no cached copy exists."
                " Unset HF_HUB_OFFLINE to download it."
            ) from exc
        if isinstance(cause, hf_errors.HfHubHTTPError) and cause.response is not None:
            raise HubError(
                f"Could not {action} '{repo_id}'{rev}: {endpoint} answered HTTP {cause.response.status_code}"
                f" and no cached copy exists.{_server_message(cause)} Retry later."
            ) from exc
        raise HubConnectionError(
            f"Could not {action} '{repo_id}'{rev}: {endpoint} is unreachable and no cached copy exists."
            " Check your network connection or HF_ENDPOINT, then retry."
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubAuthError(
                f"Not authenticated to {action} '{repo_id}' on {endpoint}: set HF_TOKEN or run `hf auth login`"
                f" with a token that has write access.{_server_message(exc)}"
            ) from exc
        if status == 403:
            raise HubAuthError(
                f"Permission denied to {action} '{repo_id}' on {endpoint}: your token lacks the rights for this"
                f" namespace (use a write token of the owner or an organization member).{_server_message(exc)}"
            ) from exc
        raise HubError(
            f"Could not {action} '{repo_id}'{rev}: HTTP {status} from {endpoint}.{_server_message(exc)}"
        ) from exc
    except hf_errors.OfflineModeIsEnabled as exc:
        raise HubConnectionError(
            f"Could not {action} '{repo_id}': HF_HUB_OFFLINE is set, so no request may leave this machine."
            " Unset HF_HUB_OFFLINE and retry."
        ) from exc
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.NetworkError) as exc:
        raise HubConnectionError(
            f"Could not {action} '{repo_id}': cannot reach {endpoint} ({type(exc).__name__})."
            " Check your network connection or HF_ENDPOINT, then retry."
        ) from exc
