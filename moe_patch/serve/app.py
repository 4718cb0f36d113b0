"""The FastAPI app: the OpenAI routes, ``GET /stats``, the model list, OpenAI-shaped errors, the request-size bound
and the optional API key.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /stats``, ``GET /health`` and ``POST /load_model`` (which ``transformers chat`` calls before chatting; it answers
that the model is ready).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..text import byte_limit
from .auth import APIKeyMiddleware
from .errors import install_error_handlers
from .handlers import Served, chat_completion, completion
from .request_size import RequestSizeMiddleware
from .responses import sse

#: How long ``GET /stats`` waits for the engine's thread to read the offload engine's report.
STATS_WAIT_S = 2.0


def build_app(served: Served, *, api_key: str | None = None, max_request_bytes: int | None = None) -> FastAPI:
    """The app serving ``served``; requests without ``api_key`` (when given) get 401, bodies over ``max_request_bytes``
    (default: ``moe_patch.text.byte_limit`` of the model's context) get 413."""
    app = FastAPI(title="moe-patch serve", docs_url=None, redoc_url=None)
    created = int(time.time())

    def entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "moe-patch"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: dict = Body(...)):  # noqa: B008 - FastAPI's way to take a JSON object
        return await chat_completion(served, body, request)

    @app.post("/v1/completions")
    async def complete(request: Request, body: dict = Body(...)):  # noqa: B008
        return await completion(served, body, request)

    @app.get("/v1/models")
    def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [entry(name) for name in served.names.names]})

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str) -> JSONResponse:
        served.names.check(model_id)
        return JSONResponse(entry(served.names.find(model_id) or served.names.primary))

    @app.get("/stats")
    async def stats() -> JSONResponse:
        engine = served.engine
        try:  # read between two passes; a long prefill or generate() meanwhile: the report of the last idle moment
            await asyncio.wait_for(asyncio.wrap_future(engine.call(engine.engine_report)), STATS_WAIT_S)
        except asyncio.TimeoutError:
            pass
        return JSONResponse({"model": served.names.primary, **engine.status(), **engine.book.to_dict()})

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.post("/load_model")
    def load_model(body: dict | None = Body(None)) -> StreamingResponse:  # noqa: B008
        # transformers chat reads loading progress as server-sent events until "ready": the model is loaded
        served.names.check((body or {}).get("model"))
        return StreamingResponse(
            iter([sse({"status": "ready", "model": served.names.primary, "cached": True})]),
            media_type="text/event-stream",
        )

    app.state.served = served
    install_error_handlers(app)
    limit = max_request_bytes or byte_limit(served.context)
    app.add_middleware(RequestSizeMiddleware, limit=limit, context=served.context)
    if api_key:  # added last: the outermost, so a request without the key is answered before its size matters
        app.add_middleware(APIKeyMiddleware, key=api_key)
    return app
