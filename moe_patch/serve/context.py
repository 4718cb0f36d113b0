"""How many tokens a generation may add: the one policy the server and `moe-patch chat` apply.

A prompt that fills the model's context is refused. An explicit length that would run past the context
is refused too (as OpenAI's API does: the caller asked for something the model cannot give). A default
length is cut to the room the prompt leaves.
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError


class ContextLengthError(InvalidArgumentError):
    """The prompt, or the prompt plus the requested new tokens, does not fit in the model's context."""


def context_length(config: Any) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its text config), None if it has none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def new_token_budget(prompt_tokens: int, context: int | None, max_new_tokens: int, explicit: bool) -> int:
    """``max_new_tokens`` if it fits after ``prompt_tokens`` in ``context``; a default one cut to fit."""
    if prompt_tokens < 1:
        raise InvalidArgumentError("the prompt has no tokens; write some text.")
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens but the model's context is {context} tokens; shorten it."
        )
    room = context - prompt_tokens
    if max_new_tokens <= room:
        return max_new_tokens
    if explicit:
        raise ContextLengthError(
            f"the prompt ({prompt_tokens} tokens) plus {max_new_tokens} new tokens exceeds the model's context "
            f"of {context} tokens; ask for at most {room} new tokens."
        )
    return room
