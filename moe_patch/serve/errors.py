"""Every error the server answers has OpenAI's shape, so clients show the message instead of a parse error:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

FastAPI's own refusals (``HTTPException``: unknown routes, wrong methods) and malformed bodies (its 422 validation
list) are rewritten here, in one place, as are unexpected exceptions (500, logged with their traceback).
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import InvalidArgumentError

logger = logging.getLogger("moe_patch.serve")


class RequestError(InvalidArgumentError):
    """A request the server refuses: HTTP ``status`` and OpenAI's ``param`` / ``code`` fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _json_error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: Any) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return _json_error(exc.status, error_body(exc.message, exc.type, exc.param, exc.code), exc.headers)

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods
    async def _http_error(request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code in (404, 405) and message in ("Not Found", "Method Not Allowed"):  # the router's own
            message = f"{request.method} {request.url.path}: {message.lower()} on this server (see docs/serve.md)"
        return _json_error(exc.status_code, error_body(message, kind, code=code), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)  # the body is not JSON, or not a JSON object
    async def _malformed(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
        else:
            message = "the request body must be a JSON object"
        return _json_error(400, error_body(message))

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        logger.error("internal error while serving a request", exc_info=exc)
        return _json_error(500, error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"))
