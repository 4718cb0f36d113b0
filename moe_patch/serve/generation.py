"""How requests share the one offload engine: one generation at a time, first come first served.

transformers' ``GenerateManager`` already runs every ``model.generate()`` of a model on one persistent
``InferenceThread`` fed by a FIFO queue; moe-patch keeps exactly that and gives every request the same
manager (the server holds one model), so generations never overlap and each one's offload statistics
are its own. Batched decoding would share expert reads between requests, but transformers' continuous
batching runs its own paged-attention forward, which the offload engine is not measured against, so it
is not offered.

On top of transformers' manager, this one
- checks the prompt against the model's context before queueing (``context.new_token_budget``);
- seeds on the inference thread, right before the request's generate() (transformers seeds when it
  builds the request, on the event loop, which reseeds whatever generation is running then);
- stops at the request's stop strings with any tokenizer (``stops.py``);
- measures each generation in the :class:`~moe_patch.serve.stats.StatsBook`.

A client that disconnects from a stream cancels its generation at the next token (transformers'
``DirectStreamer.cancel``), between two forward passes, so the engine is left as a finished generation
leaves it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from transformers.cli.serving.utils import GenerateManager, GenerationState, InferenceThread

from ..errors import InvalidArgumentError
from .context import ContextLengthError, new_token_budget
from .errors import RequestError
from .sampling import Sampling
from .stats import StatsBook
from .stops import ModelWithStops


@dataclass
class RequestScope:
    """What a handler knows about its request that transformers' calls into the manager do not carry."""

    request_id: str | None = None
    seed: int | None = None
    max_tokens_given: bool = True
    prompt_tokens: int | None = None
    stops: list[str] | None = None


# Set by the handler for the duration of one request (each request runs in its own asyncio task, whose
# context this variable lives in), read by the manager when transformers' handler calls it.
CURRENT_REQUEST: ContextVar[RequestScope | None] = ContextVar("moe_patch_request", default=None)


class OffloadGenerateManager(GenerateManager):
    """transformers' sequential manager with admission, per-request seeding and offload statistics."""

    def __init__(self, book: StatsBook, context: int | None, thread: InferenceThread | None = None):
        # the thread the model was loaded on (``loader.py`` says why); transformers' own init makes a new one
        self._thread = thread or InferenceThread()
        self.book = book
        self.context = context

    def _admit(self, inputs: dict, gen_config: Any, request_id: str) -> RequestScope:
        """Count the prompt and fix the length (or refuse the request) before it is queued; take the stop strings."""
        scope = CURRENT_REQUEST.get() or RequestScope(request_id)
        ids = inputs["input_ids"]
        scope.prompt_tokens = int(ids.shape[-1]) if hasattr(ids, "shape") else len(ids)
        try:
            gen_config.max_new_tokens = new_token_budget(
                scope.prompt_tokens, self.context, gen_config.max_new_tokens, scope.max_tokens_given
            )
        except ContextLengthError as exc:
            raise RequestError(str(exc), code="context_length_exceeded") from None
        except InvalidArgumentError as exc:  # a prompt of no tokens
            raise RequestError(str(exc)) from None
        stops = gen_config.stop_strings  # handled by ModelWithStops: transformers' own fails on some tokenizers
        gen_config.stop_strings = None
        scope.stops = [stops] if isinstance(stops, str) else list(stops or [])
        return scope

    @staticmethod
    def _model(model: Any, processor: Any, scope: RequestScope) -> Any:
        return ModelWithStops(model, processor, scope.stops, scope.prompt_tokens) if scope.stops else model

    def generate_streaming(self, model, processor, inputs, gen_config, request_id, response_parser=None):
        scope = self._admit(inputs, gen_config, request_id)
        return super().generate_streaming(self._model(model, processor, scope), processor, inputs, gen_config,
                                          request_id, response_parser)

    async def generate_non_streaming(self, model, processor, inputs, gen_config, request_id):
        scope = self._admit(inputs, gen_config, request_id)
        return await super().generate_non_streaming(self._model(model, processor, scope), processor, inputs,
                                                    gen_config, request_id)

    # transformers' manager sends every generate() through these two; called on the event loop, in the
    # request's context, so the scope read here is the request's.
    def submit(self, fn: Callable, *args: Any, **kwargs: Any):
        return super().submit(self._measured(fn), *args, **kwargs)

    def async_submit(self, fn: Callable, *args: Any, **kwargs: Any):
        return super().async_submit(self._measured(fn), *args, **kwargs)

    def _measured(self, fn: Callable) -> Callable:
        scope = CURRENT_REQUEST.get() or RequestScope()
        ticket = self.book.enqueue(scope.request_id, scope.prompt_tokens)
        sampling = Sampling(seed=scope.seed)

        def run(*args: Any, **kwargs: Any) -> Any:  # on the inference thread
            sampling.seeded()
            return self.book.measure(ticket, fn, *args, **kwargs)

        return run


class OffloadGenerationState(GenerationState):
    """transformers' generation state with the one manager of the server's one model."""

    def __init__(self, manager: OffloadGenerateManager):
        super().__init__(continuous_batching=False)
        self.manager = manager

    def get_manager(self, model_id: str, use_cb: bool = False) -> OffloadGenerateManager:
        return self.manager
