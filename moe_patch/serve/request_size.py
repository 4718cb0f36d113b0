"""Request bodies are bounded before anything parses or tokenizes them.

A prompt far larger than the model's context can only be refused, but before this bound transformers' handler
read, parsed and tokenized it first (a 50 MB prompt: 97 s and 3.3 GB of RSS, then a 400). The limit is
``moe_patch.text.byte_limit`` of the model's context (``--max-request-bytes`` overrides it). A body that declares a
larger Content-Length is refused from its headers; a chunked one is counted as it arrives and refused once past the
limit. Either way the rest of the body is read and dropped (up to :data:`DRAIN_BYTES`) before the 413 is sent:
HTTP clients send their whole body before reading the answer, and a connection closed under them reports a broken
pipe instead of the reason. A plain ASGI middleware, like the API-key check.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..sizes import format_bytes
from .errors import error_body

#: Of a refused body, at most this much is read and dropped, for at most this long, so the client gets its 413;
#: beyond either the connection is closed unread (memory stays flat either way: nothing is kept).
DRAIN_BYTES = 256 * 2**20
DRAIN_SECONDS = 5.0


class RequestSizeMiddleware:
    """413 (OpenAI-shaped, ``code: request_too_large``) for a body over ``limit`` bytes."""

    def __init__(self, app: Any, limit: int, context: int | None):
        self.app, self.limit, self.context = app, limit, context

    def _message(self, size: int | None) -> str:
        held = f"the model's context of {self.context} tokens" if self.context else "a prompt"
        size_text = f"{format_bytes(size)} ({size} bytes)" if size is not None else f"over {format_bytes(self.limit)}"
        return (
            f"the request body is {size_text}; this server reads at most {format_bytes(self.limit)} per request, "
            f"far more than {held} can hold (start it with --max-request-bytes SIZE to change the limit)"
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", ()))
        declared = headers.get(b"content-length")
        if declared is not None:  # the server checks that the body matches it
            size = int(declared) if declared.isdigit() else 0
            if size > self.limit:
                await self._refuse(scope, receive, send, size, drained=0)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.limit:
                await self._refuse(scope, receive, send, None, drained=total, more=message.get("more_body", False))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(
        self, scope: dict, receive: Any, send: Any, size: int | None, drained: int, more: bool = True
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        try:
            while more and drained < DRAIN_BYTES:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
                if message["type"] != "http.request":
                    break
                drained += len(message.get("body", b""))
                more = message.get("more_body", False)
        except asyncio.TimeoutError:  # a body that never ends: answer anyway
            pass
        from fastapi.responses import JSONResponse

        response = JSONResponse(
            error_body(self._message(size), code="request_too_large"), status_code=413, headers={"Connection": "close"}
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Any):
    """An ASGI ``receive`` that gives the already-read ``body`` once, then the connection's own messages."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
