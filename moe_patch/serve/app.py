"""The FastAPI app: transformers' ``build_server`` with moe-patch's manager, handlers and generation state,
plus ``GET /stats``, ``GET /v1/models/{id}``, OpenAI-shaped errors and the optional API key.

Routes kept from transformers: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health`` and ``POST /load_model`` (which ``transformers chat`` calls first; it answers "ready").
Dropped: ``/reset`` (it would unload the one model the server exists for) and the endpoints whose
requests this server does not check (``/v1/responses``, ``/v1/systemone``, ``/v1/audio/transcriptions``).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from transformers.cli.serving.server import build_server

from ..text import byte_limit
from .auth import APIKeyMiddleware
from .context import context_length
from .errors import install_error_handlers
from .generation import OffloadGenerateManager, OffloadGenerationState
from .handlers import OffloadChatHandler, OffloadCompletionHandler
from .loader import OffloadModelManager
from .request_size import RequestSizeMiddleware
from .stats import StatsBook

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/load_model")


def build_app(manager: OffloadModelManager, *, api_key: str | None = None,
              max_request_bytes: int | None = None) -> FastAPI:
    """The app serving ``manager``'s model; requests without ``api_key`` (when given) get 401, bodies over
    ``max_request_bytes`` (default: ``moe_patch.text.byte_limit`` of the model's context) get 413."""
    from ..offload import get_offload_handle

    model = manager.model
    book = StatsBook(get_offload_handle(model))
    context = context_length(model.config)
    generation = OffloadGenerationState(OffloadGenerateManager(book, context, thread=manager.thread))
    common = {"model_manager": manager, "generation_state": generation}
    app = build_server(
        manager, OffloadChatHandler(**common), completion_handler=OffloadCompletionHandler(**common),
        response_handler=None, transcription_handler=None, systemone_handler=None, generation_state=generation,
    )
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) in ROUTES
                         or getattr(r, "path", "").startswith(("/docs", "/openapi", "/redoc"))]

    @app.get("/v1/models/{model_id:path}")
    def retrieve_model(model_id: str) -> JSONResponse:
        manager.check_name(model_id)
        return JSONResponse(manager.get_gen_models()[0])

    @app.get("/stats")
    def stats() -> JSONResponse:
        return JSONResponse({"model": manager.name, **book.to_dict()})

    app.state.stats_book = book
    app.state.generation = generation
    install_error_handlers(app)
    app.add_middleware(RequestSizeMiddleware, limit=max_request_bytes or byte_limit(context), context=context)
    if api_key:  # added last: the outermost, so a request without the key is answered before its size matters
        app.add_middleware(APIKeyMiddleware, key=api_key)
    return app

