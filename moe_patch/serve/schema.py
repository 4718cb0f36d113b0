"""What a request may contain, checked before anything is tokenized or queued.

Three kinds of fields:
- fields the server acts on, with their types and ranges (pydantic, strict: ``"5"`` is not 5; ranges from
  :mod:`.limits`);
- fields of OpenAI's request that would change the answer but are not implemented (``n > 1``,
  ``response_format``...): refused, unless they hold the value that changes nothing. (transformers'
  server only logs a warning for these, so a client asking for JSON mode silently got free text.)
- bookkeeping fields that cannot change the answer (``user``, ``metadata``...): accepted and ignored.
Anything else is not an OpenAI field at all (a typo such as ``max_token``) and is refused by name.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..text import text_problem
from . import limits
from .errors import RequestError

#: OpenAI's API takes up to 4 stop sequences.
MAX_STOP_STRINGS = 4
#: OpenAI's limits on alternatives per token: chat's ``top_logprobs``, the legacy completions' ``logprobs``.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

# The fields of OpenAI's requests (openai-python's CompletionCreateParams types when this was written), and
# transformers' extensions that this server acts on too (`generation_config`, `chat_template_kwargs`).
CHAT_FIELDS = {
    "messages",
    "model",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "moderation",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "prompt_cache_options",
    "prompt_cache_retention",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
    "generation_config",
    "chat_template_kwargs",
}
COMPLETION_FIELDS = {
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
    "generation_config",
}

# moe-patch's extensions of OpenAI's request (transformers' own settings; vLLM and llama.cpp take them too)
EXTENSIONS = {"top_k", "repetition_penalty"}

# OpenAI fields with no effect on the tokens generated.
BOOKKEEPING = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "stream_options",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
}

# Unimplemented OpenAI fields, accepted only with the values that change nothing.
NO_OP_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    # fill-in-the-middle needs the model's own infill format; transformers' server appended the suffix to the answer
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "parallel_tool_calls": (None, True, False),  # the chat template decides how tools are called
    "tool_choice": (None, "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _TextPart(_Strict):
    type: Literal["text"]  # a text-only server: an image would be dropped without a word by transformers
    text: str


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None


class _Generation(_Strict):
    model: str | None = None
    stream: bool | None = None
    max_tokens: int | None = Field(None, **limits.MAX_NEW_TOKENS.constraints())
    temperature: float | None = Field(None, **limits.TEMPERATURE.constraints())
    top_p: float | None = Field(None, **limits.TOP_P.constraints())
    top_k: int | None = Field(None, **limits.TOP_K.constraints())
    repetition_penalty: float | None = Field(None, **limits.REPETITION_PENALTY.constraints())
    frequency_penalty: float | None = Field(None, **limits.FREQUENCY_PENALTY.constraints())
    seed: int | None = Field(None, **limits.SEED.constraints())
    stop: str | list[str] | None = None
    generation_config: str | None = None  # transformers' extension: a GenerationConfig as a JSON string

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences (as OpenAI's API), got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return value

    @field_validator("generation_config")
    @classmethod
    def _json_object(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a GenerationConfig as a JSON string ({exc})") from None
            if not isinstance(parsed, dict):
                raise ValueError("must be a JSON object")
        return value


class ChatRequest(_Generation):
    openai_fields: ClassVar[set[str]] = CHAT_FIELDS

    messages: list[_Message] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, **limits.MAX_NEW_TOKENS.constraints())
    tools: list[dict] | None = None
    chat_template_kwargs: dict | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias, as OpenAI's

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f'keys must be token ids such as "50256", got {key!r}')
        return value


class CompletionRequest(_Generation):
    openai_fields: ClassVar[set[str]] = COMPLETION_FIELDS

    prompt: str = Field(min_length=1)  # one string (OpenAI's also takes lists: n prompts, n answers)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)  # alternatives per token


def _check_text(value: Any, where: str) -> None:
    """Refuse (400, naming the field) a string anywhere in the body that is not Unicode text: JSON can carry lone
    surrogates (``"\\ud800"``), which no tokenizer encodes (transformers' answered them with a 500)."""
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise RequestError(
                f"{where}: {problem}; send Unicode text (surrogates only in pairs)", param=where, code="invalid_value"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and text_problem(key):
                name = where or "the request body"
                raise RequestError(
                    f"a key of {name} is {text_problem(key)}; send Unicode text",
                    param=where or None,
                    code="invalid_value",
                )
            _check_text(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}.{i}")


def check_request(body: dict[str, Any], schema: type[ChatRequest] | type[CompletionRequest]) -> None:
    """Raise :class:`RequestError` for the first problem of ``body``."""
    _check_text(body, "")  # first: no other message may echo a string that cannot be encoded
    known = schema.openai_fields | EXTENSIONS
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unrecognized request argument: {unknown[0]}", param=unknown[0], code="unknown_parameter")
    acted_on = set(schema.model_fields)
    for name in sorted(set(body) - acted_on - BOOKKEEPING):
        if body[name] not in NO_OP_VALUES.get(name, (None,)):
            raise RequestError(f"{name} is not supported by moe-patch serve", param=name, code="unsupported_parameter")
    try:
        schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        missing = err["type"] == "missing"
        message = f"missing required parameter: {where}" if missing else f"{where}: {err['msg']}"
        raise RequestError(
            message, param=where, code="missing_required_parameter" if missing else "invalid_value"
        ) from None
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise RequestError(
            "top_logprobs needs logprobs: true (as OpenAI's API)", param="top_logprobs", code="invalid_value"
        )
