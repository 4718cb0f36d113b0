"""API-key check: with a key, every request must carry ``Authorization: Bearer KEY`` (as OpenAI clients
send ``api_key``) or gets 401. A plain ASGI middleware, so it answers before the body is read and leaves
streaming untouched. The key is held in memory only: never logged, echoed or put in a message.

A key sent in the query string (``?api_key=...``) is not accepted (401), but uvicorn's access log writes every
request line with its query: :class:`QueryValuesFilter` writes the query's parameter names only. The server reads
no query parameter, so nothing of use is lost, and no list of key-like names can miss one (``?k=sk-...``).
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from .errors import error_body


class APIKeyMiddleware:
    def __init__(self, app: Any, key: str):
        self.app = app
        self._key = key.encode()

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                # constant-time comparison: the answer's timing says nothing about the key
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self._authorized(scope):
            from fastapi.responses import JSONResponse

            body = error_body(
                "missing or incorrect API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key"
            )
            await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)


#: What replaces each query value in the access log.
REDACTED = "..."


def redact_query(path: str) -> str:
    """``/v1/models?api_key=sk-1&x=2`` -> ``/v1/models?api_key=...&x=...``: parameter names kept, values dropped."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    names = [item.partition("=")[0] if "=" in item else REDACTED for item in query.split("&") if item]
    return f"{base}?{'&'.join(n if n == REDACTED else f'{n}={REDACTED}' for n in names)}"


class QueryValuesFilter(logging.Filter):
    """On uvicorn's ``uvicorn.access`` logger: the request line without the query's values. Its records carry
    ``(client, method, path with query, HTTP version, status)`` as arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True
