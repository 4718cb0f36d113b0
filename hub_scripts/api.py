"""One `HfApi` client per command, configured from the environment at call time.

huggingface_hub's module-level helpers (`upload_file`, `ModelCard.push_to_hub`, ...) bind the endpoint
when the library is imported, so a later `HF_ENDPOINT` (a mirror, a test server) would be ignored.
Everything in hub_scripts therefore takes an explicit `api` and only builds one here.
"""

from __future__ import annotations

import os

from huggingface_hub import HfApi, constants
from huggingface_hub.utils import validate_repo_id

from .errors import InvalidRepoIdError


def make_api(*, endpoint: str | None = None, token: str | bool | None = None) -> HfApi:
    """Build the client: endpoint from the argument, else `HF_ENDPOINT`, else huggingface.co.

    `token=None` lets huggingface_hub find it the usual way (`HF_TOKEN`, then the file written by
    `hf auth login`); the token is only ever handed to the client, never stored or printed here.
    """
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    from moe_patch import __version__

    return HfApi(endpoint=endpoint.rstrip("/"), token=token, library_name="moe-patch", library_version=__version__)


def check_repo_id(repo_id: str) -> str:
    """Validate `namespace/name` locally so a typo fails before any network call."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InvalidRepoIdError(
            f"'{repo_id}' is not a valid repository id: expected 'namespace/name', e.g. 'my-user/my-moe'."
        )
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:
        raise InvalidRepoIdError(
            f"'{repo_id}' is not a valid repository id: {exc} Use 'namespace/name' with letters, digits, '-', '_', '.'."
        ) from exc
    return repo_id
