"""OpenAI's answer shapes: chat completions and (legacy) completions, whole or as server-sent events, with usage
(``prompt_tokens_details.cached_tokens``: what the prompt cache saved) and log-probabilities.

Written as plain dictionaries: the shapes are small and stable, and the server then needs no client library.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .sampler import TokenLogprob

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class TokenText:
    """How a token is shown in log-probabilities: its text, and its UTF-8 bytes (None where the token is part of a
    character, which decodes to U+FFFD: OpenAI's ``bytes`` is null when there is no byte representation)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": None if "\ufffd" in text else list(text.encode("utf-8"))}

    def chat(self, entries: list[tuple[int, TokenLogprob]]) -> dict[str, Any]:
        """Chat's ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        return {
            "content": [
                {**self.entry(lp.token_id, lp.logprob), "top_logprobs": [self.entry(t, v) for t, v in lp.top]}
                for _, lp in entries
            ],
            "refusal": None,
        }

    def legacy(self, entries: list[tuple[int, TokenLogprob]], offset: int = 0) -> dict[str, Any]:
        """The completions endpoint's ``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``,
        ``text_offset``); ``offset``: where this piece's text begins in the answer."""
        return {
            "tokens": [self.text(lp.token_id) for _, lp in entries],
            "token_logprobs": [lp.logprob for _, lp in entries],
            "top_logprobs": [{self.text(t): v for t, v in lp.top} for _, lp in entries],
            "text_offset": [offset + start for start, _ in entries],
        }


class ChatAnswer:
    """The ``chat.completion`` / ``chat.completion.chunk`` objects of one request."""

    def __init__(self, request_id: str, model: str):
        self.id, self.model, self.created = request_id, model, int(time.time())

    def _base(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def chunk(
        self,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        usage: dict[str, Any] | None = None,
    ) -> str:
        body = {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if usage is not None:
            body["usage"] = usage
        return sse(body)

    def whole(
        self, message: dict[str, Any], finish_reason: str, usage: dict[str, Any], logprobs: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return {
            **self._base("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", **message},
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }


class CompletionAnswer:
    """The ``text_completion`` objects of one request (streamed chunks have the same shape)."""

    def __init__(self, request_id: str, model: str):
        self.id, self.model, self.created = request_id, model, int(time.time())

    def body(
        self,
        text: str,
        finish_reason: str | None,
        logprobs: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if usage is not None:
            body["usage"] = usage
        return body

    def chunk(self, *args: Any, **kwargs: Any) -> str:
        return sse(self.body(*args, **kwargs))


def error_event(message: str) -> str:
    """A stream's last event when the generation failed after the answer began (the status was already sent)."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
