"""API-key check: with a key, every request must carry ``Authorization: Bearer KEY`` (as OpenAI clients
send ``api_key``) or gets 401. A plain ASGI middleware, so it answers before the body is read and leaves
streaming untouched. The key is held in memory only: never logged, echoed or put in a message."""

from __future__ import annotations

import hmac
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

            body = error_body("missing or incorrect API key: send the header `Authorization: Bearer <key>`",
                              code="invalid_api_key")
            await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)
