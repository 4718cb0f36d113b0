"""transformers' chat-completion and completion handlers, with the request checked first (``schema.py``),
the request's scope handed to the generation manager, the sampling rule of ``sampling.py``, and
OpenAI's closing ``data: [DONE]`` line on streams (transformers' server ends a stream without it; OpenAI's
API sends it, and some clients read until they see it)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from jinja2 import TemplateError
from starlette.responses import StreamingResponse
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler

from .errors import RequestError
from .generation import CURRENT_REQUEST, RequestScope
from .sampling import Sampling
from .schema import ChatRequest, CompletionRequest, check_request

# transformers' default when a request gives no length (its BaseHandler uses the same floor)
DEFAULT_MAX_NEW_TOKENS = 1024
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")


def _asks_for_length(body: dict[str, Any]) -> bool:
    if any(body.get(k) is not None for k in _LENGTH_FIELDS):
        return True
    config = body.get("generation_config")
    return config is not None and json.loads(config).get("max_new_tokens") is not None


async def _ending_with_done(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
        yield "data: [DONE]\n\n"
    finally:  # closed early (client gone): close transformers' stream too, which cancels the generation
        await chunks.aclose()


class _OffloadHandler:
    """Mixed in before a transformers handler class."""

    schema: type  # of schema.py

    def _check(self, body: dict[str, Any]) -> None:
        check_request(body, self.schema, self._valid_params_class)
        if body.get("model") is not None:  # none: the one model served
            self.model_manager.check_name(body["model"])

    async def handle_request(self, body: dict, request_id: str):
        self._check(body)
        scope = RequestScope(request_id, seed=body.pop("seed", None), max_tokens_given=_asks_for_length(body))
        token = CURRENT_REQUEST.set(scope)
        try:
            response = await super().handle_request(body, request_id)
        except TemplateError as exc:
            raise RequestError(f"the chat template cannot render these messages: {exc}", param="messages") from None
        finally:
            CURRENT_REQUEST.reset(token)
        if isinstance(response, StreamingResponse):
            response.body_iterator = _ending_with_done(response.body_iterator)
        return response

    def _validate_request(self, body: dict) -> None:
        """Done by :meth:`_check` (transformers' version warns about unsupported fields; they are refused)."""

    def _build_generation_config(self, body: dict, model_generation_config: Any, use_cb: bool = False):
        try:
            config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        except (TypeError, ValueError) as exc:  # a generation_config that GenerationConfig refuses
            raise RequestError(f"generation_config: {exc}", param="generation_config") from None
        config = Sampling.from_mapping(body).apply(config)
        if config.max_new_tokens is None:  # a generation_config without a length
            config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        return config


class OffloadChatHandler(_OffloadHandler, ChatCompletionHandler):
    """``POST /v1/chat/completions``."""

    schema = ChatRequest

    def _check(self, body: dict[str, Any]) -> None:
        super()._check(body)
        if not getattr(self.model_manager.tokenizer, "chat_template", None):
            raise RequestError("this model's tokenizer has no chat template; send the text to /v1/completions",
                               param="messages")


class OffloadCompletionHandler(_OffloadHandler, CompletionHandler):
    """``POST /v1/completions`` (a text prompt, no chat template)."""

    schema = CompletionRequest
