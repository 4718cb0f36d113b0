"""``POST /v1/chat/completions`` and ``POST /v1/completions``: the request checked (``schema.py``), turned into
token ids and a generation config, queued on the engine, answered as OpenAI's API answers, whole or streamed.

The generation config follows one rule for every route: the checkpoint's ``generation_config.json`` (or a
request's ``generation_config``, transformers' extension), at least 1024 new tokens unless the request says
(transformers' server did the same), then the request's fields: ``max_tokens`` / ``max_completion_tokens``,
``frequency_penalty`` (``repetition_penalty = 1 + value``, as transformers' server), ``logit_bias``, and the sampling
rule of ``sampling.py``; the length is then fitted to the context (``context.py``).

With a response template on the tokenizer (``response_template``, read by transformers' public ``parse_response``),
a chat answer is split into ``content``, ``reasoning_content`` and ``tool_calls``; a streamed request with ``tools``
then sends its text once it is complete (a tool call cannot be told from text before it ends).
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from .context import ContextLengthError, new_token_budget
from .engine import Delta, Engine, Failed, Finished, Job
from .errors import RequestError
from .names import ServedNames
from .responses import DONE, ChatAnswer, CompletionAnswer, TokenText, error_event, usage
from .sampler import effective_config
from .sampling import Sampling
from .schema import ChatRequest, CompletionRequest, check_request

# transformers' server's floor for the default length (a request's max_tokens is used as given)
DEFAULT_MAX_NEW_TOKENS = 1024
_LENGTH_FIELDS = ("max_completion_tokens", "max_tokens")
# a non-streamed request checks this often whether its client is still there
DISCONNECT_POLL_S = 1.0


@dataclass
class Served:
    """What the routes need of the served model."""

    engine: Engine
    tokenizer: Any
    names: ServedNames
    context: int | None
    generation_config: Any  # the checkpoint's

    @property
    def response_template(self) -> dict | None:
        return getattr(self.tokenizer, "response_template", None)


def _asks_for_length(body: dict[str, Any]) -> bool:
    if any(body.get(k) is not None for k in _LENGTH_FIELDS):
        return True
    config = body.get("generation_config")
    return config is not None and json.loads(config).get("max_new_tokens") is not None


def request_config(served: Served, body: dict[str, Any], prompt_tokens: int) -> Any:
    """The settings ``generate()`` would run this request with (``sampler.effective_config``), its length fitted."""
    from transformers import GenerationConfig

    if body.get("generation_config") is not None:
        try:
            config = GenerationConfig(**json.loads(body["generation_config"]))
        except (TypeError, ValueError) as exc:
            raise RequestError(f"generation_config: {exc}", param="generation_config") from None
    else:
        config = copy.deepcopy(served.generation_config)
        if config.max_new_tokens is None or config.max_new_tokens < DEFAULT_MAX_NEW_TOKENS:
            config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    for name in _LENGTH_FIELDS:
        if body.get(name) is not None:
            config.max_new_tokens = body[name]
            break
    if body.get("frequency_penalty") is not None:
        config.repetition_penalty = 1.0 + body["frequency_penalty"]
    if body.get("logit_bias"):
        vocab = len(served.tokenizer)
        bad = [k for k in body["logit_bias"] if int(k) >= vocab]
        if bad:
            raise RequestError(
                f"logit_bias: token {bad[0]} is not in the vocabulary of {vocab} tokens",
                param="logit_bias",
                code="invalid_value",
            )
        config.sequence_bias = {(int(k),): float(v) for k, v in body["logit_bias"].items()}
    config = Sampling.from_mapping(body).apply(config)
    if config.max_new_tokens is None:  # a generation_config without a length
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    config.stop_strings = list(stop_strings(body, config)) or None  # matched on the text by the engine
    config = effective_config(config, served.generation_config)
    try:
        config.max_new_tokens = new_token_budget(
            prompt_tokens, served.context, config.max_new_tokens, _asks_for_length(body)
        )
    except ContextLengthError as exc:
        raise RequestError(str(exc), code="context_length_exceeded") from None
    return config


def stop_strings(body: dict[str, Any], config: Any) -> tuple[str, ...]:
    """The request's ``stop``, then any ``stop_strings`` of its ``generation_config``."""
    out = []
    for value in (body.get("stop"), config.stop_strings):
        out += [value] if isinstance(value, str) else list(value or [])
    return tuple(dict.fromkeys(out))


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates read them: text parts joined, tool-call arguments parsed from JSON."""
    out = []
    for message in messages:
        m = {"role": message["role"]}
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(part["text"] for part in content)
        if "tool_calls" in message:  # templates iterate the arguments as a mapping; the content is markup
            calls = copy.deepcopy(message["tool_calls"])
            for call in calls:
                function = call.get("function", call)
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except json.JSONDecodeError:
                        raise RequestError(
                            "a tool call's arguments are not JSON", param="messages", code="invalid_value"
                        ) from None
            m["tool_calls"], content = calls, None
        m["content"] = content or ""
        if "tool_call_id" in message:
            m["tool_call_id"] = message["tool_call_id"]
        out.append(m)
    return out


def chat_prompt(served: Served, body: dict[str, Any]) -> list[int]:
    if not getattr(served.tokenizer, "chat_template", None):
        raise RequestError(
            "this model's tokenizer has no chat template; send the text to /v1/completions", param="messages"
        )
    try:
        encoded = served.tokenizer.apply_chat_template(
            chat_messages(body["messages"]),
            tools=body.get("tools"),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(body.get("chat_template_kwargs") or {}),
        )
    except (TemplateError, TypeError) as exc:
        raise RequestError(f"the chat template cannot render these messages: {exc}", param="messages") from None
    return list(encoded["input_ids"])


def completion_prompt(served: Served, body: dict[str, Any]) -> list[int]:
    return list(served.tokenizer(body["prompt"])["input_ids"])


class _Run:
    """One queued request: its events arrive on this event loop's queue."""

    def __init__(self, served: Served, body: dict[str, Any], prompt: list[int], request_id: str, logprobs: int | None):
        config = request_config(served, body, len(prompt))
        if logprobs is not None and (why := served.engine.solo_reason(config)):
            raise RequestError(
                f"logprobs are not available for this request: it runs through transformers' "
                f"generate() because of {why}",
                param="logprobs",
                code="unsupported_parameter",
            )
        stops, config.stop_strings = config.stop_strings, None  # the engine matches them (output_text.py)
        stops = (stops,) if isinstance(stops, str) else tuple(stops or ())
        loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.job = Job(
            request_id,
            prompt,
            config,
            lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event),
            stops=stops,
            seed=body.get("seed"),
            top_logprobs=logprobs,
        )
        served.engine.submit(self.job)

    async def events(self):
        """The request's events until it ends."""
        while True:
            event = await self.queue.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return

    def cancel(self) -> None:
        """End the generation before its next pass (no effect once it has ended)."""
        self.job.cancelled.set()

    async def result(self, request: Request) -> tuple[list[Delta], Finished]:
        """All of it (non-streamed); the generation is cancelled if the client leaves meanwhile."""
        deltas = []
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise RequestError("the client went away", status=499) from None
                continue
            if isinstance(event, Failed):
                raise RequestError(f"generation failed: {event.message}", status=500, type="server_error")
            if isinstance(event, Finished):
                return deltas, event
            deltas.append(event)


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _streaming(chunks) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def parse_reply(served: Served, finished: Finished, prompt: list[int], tools: Any) -> dict[str, Any]:
    """The assistant message: ``content``, and with a response template ``reasoning_content`` and ``tool_calls``."""
    template = served.response_template
    if template is None:
        return {"content": finished.text}
    cut = len(served.tokenizer.decode(finished.token_ids, skip_special_tokens=True)) != len(finished.text)
    parsed = served.tokenizer.parse_response(finished.text if cut else finished.token_ids, prefix=prompt, tools=tools)
    message: dict[str, Any] = {"content": parsed.get("content", "")}
    reasoning = parsed.get("reasoning_content") or parsed.get("thinking")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = []
    for i, call in enumerate(parsed.get("tool_calls") or []):
        function = call.get("function", call)
        arguments = function.get("arguments")
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "index": i,
                "function": {
                    "name": function.get("name"),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    if calls:
        message["tool_calls"] = calls
    return message


async def chat_completion(served: Served, body: dict[str, Any], request: Request):
    check_request(body, ChatRequest)
    served.names.check(body.get("model"))
    prompt = chat_prompt(served, body)
    logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
    request_id = _request_id("chatcmpl")
    run = _Run(served, body, prompt, request_id, logprobs)
    answer, shown = ChatAnswer(request_id, served.names.primary), TokenText(served.tokenizer)
    tools = body.get("tools")
    parse = served.response_template is not None

    def end(finished: Finished, message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        reason = "tool_calls" if message.get("tool_calls") else finished.reason
        return reason, usage(finished.prompt_tokens, len(finished.token_ids), finished.cached_prompt_tokens)

    if not body.get("stream"):
        deltas, finished = await run.result(request)
        message = parse_reply(served, finished, prompt, tools) if parse else {"content": finished.text}
        reason, used = end(finished, message)
        entries = [e for d in deltas for e in d.logprobs]
        return JSONResponse(answer.whole(message, reason, used, shown.chat(entries) if logprobs is not None else None))

    hold = parse and bool(tools)  # text that may be a tool call is sent once complete

    async def chunks():
        try:
            async for piece in chat_chunks():
                yield piece
        finally:  # also when the client went away and the stream was closed under us
            run.cancel()

    async def chat_chunks():
        yield answer.chunk({"role": "assistant", "content": ""})
        held: list[tuple[int, Any]] = []
        async for event in run.events():
            if isinstance(event, Delta):
                if hold:
                    held.extend(event.logprobs)
                elif event.text or event.logprobs:
                    yield answer.chunk(
                        {"content": event.text}, shown.chat(event.logprobs) if logprobs is not None else None
                    )
            elif isinstance(event, Finished):
                message = {"content": ""}
                if hold:
                    message = parse_reply(served, event, prompt, tools)
                    yield answer.chunk(message, shown.chat(held) if logprobs is not None else None)
                reason, used = end(event, message)
                yield answer.chunk({}, finish_reason=reason, usage=used)
                yield DONE
            else:
                yield error_event(f"generation failed: {event.message}")
                yield DONE

    return _streaming(chunks())


async def completion(served: Served, body: dict[str, Any], request: Request):
    check_request(body, CompletionRequest)
    served.names.check(body.get("model"))
    prompt = completion_prompt(served, body)
    logprobs = body.get("logprobs")
    request_id = _request_id("cmpl")
    run = _Run(served, body, prompt, request_id, logprobs)
    answer, shown = CompletionAnswer(request_id, served.names.primary), TokenText(served.tokenizer)

    def used(finished: Finished) -> dict[str, Any]:
        return usage(finished.prompt_tokens, len(finished.token_ids), finished.cached_prompt_tokens)

    if not body.get("stream"):
        deltas, finished = await run.result(request)
        entries = [e for d in deltas for e in d.logprobs]
        return JSONResponse(
            answer.body(
                finished.text, finished.reason, shown.legacy(entries) if logprobs is not None else None, used(finished)
            )
        )

    async def chunks():
        try:
            async for event in run.events():
                if isinstance(event, Delta):
                    if event.text or event.logprobs:
                        yield answer.chunk(
                            event.text, None, shown.legacy(event.logprobs) if logprobs is not None else None
                        )
                elif isinstance(event, Finished):
                    yield answer.chunk("", event.reason, usage=used(event))
                    yield DONE
                else:
                    yield error_event(f"generation failed: {event.message}")
                    yield DONE
        finally:  # also when the client went away and the stream was closed under us
            run.cancel()

    return _streaming(chunks())
